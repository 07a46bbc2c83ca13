"""Shard content fingerprints (issue 13): a shard whose planned content and published file are
what the last build recorded is neither built nor read.

Opens are watched with an audit hook: every `open` event (builtins.open, io.open, os.open) under
the export's buckets/ and .staging/ and the work dir's processed-image store is recorded with
whether it happened inside the bucket_shards step.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bucket_assets.core.manifest import verify_export
from bucket_assets.core.processing import is_pack
from bucket_assets.core.shards import read_shard
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all, run_cli

_RECORDERS: list = []


def _in_bucket_shards() -> bool:
    f = sys._getframe()
    while f is not None:
        if f.f_code.co_name == "bucket_shards" and f.f_code.co_filename.endswith("export.py"):
            return True
        f = f.f_back
    return False


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _RECORDERS:
        return
    try:
        path = args[0]
        if isinstance(path, int):
            return
        path = os.path.abspath(os.fsdecode(path))
        for rec in _RECORDERS:
            rec(path)
    except Exception:  # noqa: BLE001 - a hook must never break the open it watches
        pass


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while a test watches


@contextmanager
def watch_opens(*roots: Path):
    """Yields a list of (path, in bucket_shards) of every open under `roots` in the block."""
    roots_s = [str(r.resolve()) + os.sep for r in roots]
    seen: list[tuple[str, bool]] = []

    def rec(path: str) -> None:
        if any(path.startswith(r) for r in roots_s):
            seen.append((path, _in_bucket_shards()))

    _RECORDERS.append(rec)
    try:
        yield seen
    finally:
        _RECORDERS.remove(rec)


def _shard_meta(result) -> dict:
    """bucket_shards' run-wide metadata (the run_* keys)."""
    meta = {}
    for mat in result.asset_materializations_for_node("bucket_shards"):
        meta.update({k: v.value for k, v in mat.metadata.items() if k.startswith("run_")})
    return meta


def _check_meta(result, check: str) -> dict:
    for ev in result.get_asset_check_evaluations():
        if ev.check_name == check:
            assert ev.passed, ev.description
            return {k: v.value for k, v in ev.metadata.items()}
    raise AssertionError(f"no evaluation of {check}")


def _shard_files(spec_path) -> list[tuple]:
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        return con.execute(
            """SELECT bucket_id, shard_index, path, samples, bytes, sha256, fingerprint, first_key, last_key,
                      file_size, mtime_ns, inode FROM shard_files ORDER BY bucket_id, shard_index"""
        ).fetchall()
    finally:
        con.close()


def _files(export: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(export)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(export.rglob("shard-*.tar"))}


@pytest.fixture
def built(make_spec, sample_root, tmp_path):
    """A built export with small shards (several per bucket), its own landing dir copy."""
    landing = tmp_path / "landing"
    shutil.copytree(sample_root / "captions", landing)
    spec_path = make_spec("fp", **{"captions.landing_dir": str(landing), "shards.max_samples": 3})
    result = materialize_all(spec_path)
    assert result.success
    meta = _shard_meta(result)
    assert meta["run_shards_built"] == meta["run_shards"] > 0 and meta["run_shards_unchanged"] == 0
    spec = load_spec(spec_path)
    return spec_path, Path(spec.output_dir), Path(spec.work_dir), landing


def test_no_op_rebuild_opens_no_shard_file_and_no_store_pack(built):
    spec_path, export, work, _ = built
    rows = _shard_files(spec_path)
    assert all(r[6] and len(r[6]) == 64 and r[9] == r[4] and r[10] and r[11] for r in rows), rows[:2]
    before = _files(export)
    # A marker in one shard_samples row (which no step of the build reads back): a no-op build
    # that rewrote the table (shard_samples derived again from the plan) would lose it.
    con = duckdb.connect(str(load_spec(spec_path).db_path))
    try:
        con.execute("UPDATE shard_samples SET text = 'marker' WHERE key = (SELECT min(key) FROM shard_samples)")
    finally:
        con.close()
    with watch_opens(export / "buckets", export / ".staging", work / "processed") as opens:
        result = materialize_all(spec_path)
    assert result.success
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM shard_samples WHERE text = 'marker'").fetchone()[0] == 1
    finally:
        con.close()
    # No step opened a shard: dataset_card's contact sheets are kept while their shards are.
    assert [p for p, _ in opens if p.endswith(".tar")] == []
    meta = _shard_meta(result)
    assert meta["run_shards_unchanged"] == meta["run_shards"] == len(before)
    assert meta["run_shards_built"] == 0 and meta["run_files_rewritten"] == 0
    assert meta["run_samples"] == sum(r[3] for r in rows)
    # Every bucket, empty ones included, stood by its plan digest: none was planned in Python.
    assert meta["run_buckets_unchanged"] == meta["run_buckets"]
    # The derived tables were kept by their versions (core.db.rebuild_unless_current).
    for asset in ("filtered_images", "bucket_assignments", "selected_captions"):
        mats = result.asset_materializations_for_node(asset)
        assert [m.metadata["rebuilt"].value for m in mats] == [False], asset
    # Nothing in the whole build opened a store pack; bucket_shards opened no file at all there,
    # nor any shard file.
    store = str((work / "processed").resolve())
    assert [p for p, _ in opens if p.startswith(store) and is_pack(os.path.basename(p))] == []
    assert [p for p, in_step in opens if in_step] == []
    assert _files(export) == before
    assert _shard_files(spec_path) == rows
    # The build's own verification read no shard either.
    assert _check_meta(result, "export_verifies")["shards_read"] == 0


def _land_caption(landing: Path, image_id: str, text: str) -> None:
    pq.write_table(pa.table({"image_id": [image_id], "caption": [text]}), landing / "recaption.parquet")
    (landing / "recaption.json").write_text(json.dumps({
        "variant": "caption_gemini_2_flash_lite", "backend": "test", "model": "test/recaption",
        "created_at": 1790000000, "system_prompt_sha256": "a" * 64, "user_prompt_sha256": "b" * 64,
    }))


def _most_sharded(rows: list[tuple]) -> tuple[dict[str, list[tuple]], str]:
    """shard_files rows by bucket, and the bucket with the most shards (first by name on a tie)."""
    by_bucket: dict[str, list[tuple]] = {}
    for r in rows:
        by_bucket.setdefault(r[0], []).append(r)
    return by_bucket, max(sorted(by_bucket), key=lambda b: len(by_bucket[b]))


def test_a_caption_change_rebuilds_only_the_shard_that_holds_it(built):
    spec_path, export, work, landing = built
    rows = _shard_files(spec_path)
    by_bucket, bucket = _most_sharded(rows)
    assert len(by_bucket[bucket]) >= 3
    shard = by_bucket[bucket][1]
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        image_id = con.execute("SELECT image_id FROM shard_samples WHERE bucket_id = ? AND shard_index = ? ORDER BY key",
                               [bucket, shard[1]]).fetchone()[0]
    finally:
        con.close()
    before = _files(export)
    _land_caption(landing, image_id, "a completely different caption, longer than the one it replaces")
    with watch_opens(export / "buckets", work / "processed") as opens:
        result = materialize_all(spec_path)
    assert result.success
    meta = _shard_meta(result)
    assert meta["run_shards_built"] == 1 and meta["run_files_rewritten"] == 1
    assert meta["run_shards_unchanged"] == len(rows) - 1
    # Only that bucket's plan digest changed: no other bucket was planned.
    assert meta["run_buckets_unchanged"] == meta["run_buckets"] - 1
    # A new caption source: the selection is built again, the tables before it are kept.
    rebuilt = {a: [m.metadata["rebuilt"].value for m in result.asset_materializations_for_node(a)]
               for a in ("filtered_images", "bucket_assignments", "selected_captions")}
    assert rebuilt == {"filtered_images": [False], "bucket_assignments": [False], "selected_captions": [True]}
    after = _files(export)
    changed = sorted(k for k in after if after[k] != before[k])
    assert changed == [shard[2]]
    parts = dict(read_shard(export / shard[2]))
    assert b"a completely different caption" in b"".join(p["txt"] for p in parts.values())
    # bucket_shards read only that bucket's store (its JPEGs), no published shard: the recorded
    # file was known to differ, so it was not compared either.
    in_step = [p for p, s in opens if s]
    store = str((work / "processed" / bucket).resolve()) + os.sep
    assert in_step and all(p.startswith(store) for p in in_step), in_step
    # Only the rebuilt shard is re-verified by the build's check.
    assert _check_meta(result, "export_verifies")["shards_read"] == 1
    verify_export(export)


def _range_digests(spec_path) -> list[tuple]:
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        return con.execute("SELECT bucket_id, shard_index, fingerprint, range_digest, first_key, last_key, samples "
                           "FROM shard_files ORDER BY bucket_id, shard_index").fetchall()
    finally:
        con.close()


def test_a_change_in_a_later_shard_plans_its_bucket_from_the_shard_before_it(built, make_spec):
    spec_path, export, work, landing = built
    rows = _shard_files(spec_path)
    by_bucket, bucket = _most_sharded(rows)
    n = len(by_bucket[bucket])
    assert n >= 3
    db = str(load_spec(spec_path).db_path)
    con = duckdb.connect(db)
    try:
        image_id = con.execute("SELECT image_id FROM shard_samples WHERE bucket_id = ? AND shard_index = ? ORDER BY key",
                               [bucket, n - 1]).fetchone()[0]
        # Markers in the rows of a shard that stands and of the one planned again before the
        # changed one: the first must survive (not rewritten), the second is derived again.
        for i in (0, n - 2):
            con.execute("UPDATE shard_samples SET text = 'marker' WHERE bucket_id = ? AND shard_index = ?", [bucket, i])
    finally:
        con.close()
    before = _files(export)
    _land_caption(landing, image_id, "a completely different caption, longer than the one it replaces")
    result = materialize_all(spec_path)
    assert result.success
    meta = _shard_meta(result)
    assert meta["run_buckets_resumed"] == 1 and meta["run_buckets_unchanged"] == meta["run_buckets"] - 1
    assert meta["run_shards_built"] == 1 and meta["run_files_rewritten"] == 1
    assert meta["run_shards_unchanged"] == len(rows) - 1
    after = _files(export)
    assert sorted(k for k in after if after[k] != before[k]) == [by_bucket[bucket][-1][2]]
    con = duckdb.connect(db, read_only=True)
    try:
        marked = con.execute("SELECT DISTINCT shard_index FROM shard_samples WHERE bucket_id = ? AND text = 'marker'",
                             [bucket]).fetchall()
        assert marked == [(0,)]
        got = con.execute("SELECT shard_index, count(*) FROM shard_samples WHERE bucket_id = ? GROUP BY ALL ORDER BY ALL",
                          [bucket]).fetchall()
    finally:
        con.close()
    assert got == [(r[1], r[3]) for r in by_bucket[bucket]]
    verify_export(export)
    # The same sources built from nothing: the same shard bytes and the same recorded rows.
    fresh = make_spec("fp-fresh", **{"captions.landing_dir": str(landing), "shards.max_samples": 3})
    assert materialize_all(fresh).success
    fresh_export = Path(load_spec(fresh).output_dir)
    assert {k: v[2] for k, v in _files(fresh_export).items()} == {k: v[2] for k, v in after.items()}
    assert _range_digests(fresh) == _range_digests(spec_path)
    # Another build is a no-op by the bucket digests recorded with the standing shards.
    again = _shard_meta(materialize_all(spec_path))
    assert again["run_buckets_unchanged"] == again["run_buckets"] and again["run_shards_built"] == 0


def _tamper(path: Path, restore_mtime: bool) -> None:
    """Change bytes of a .txt member in place: same size, same inode, other content."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        import tarfile

        with tarfile.open(fileobj=f, mode="r:") as tf:
            m = next(m for m in tf if m.name.endswith(".txt") and m.size > 1)
    data[m.offset_data] = ord("X") if data[m.offset_data] != ord("X") else ord("Y")
    with open(path, "r+b") as f:
        f.write(data)
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino


def test_a_shard_changed_behind_the_builds_back_is_rebuilt_and_verify_names_a_disguised_one(built):
    spec_path, export, _, _ = built
    rows = _shard_files(spec_path)
    before = _files(export)
    rel = rows[0][2]

    # Same size, other bytes, other mtime: the next build rebuilds it and its check re-reads it.
    _tamper(export / rel, restore_mtime=False)
    r = run_cli("verify", str(export))
    assert r.returncode == 1 and rel in r.stderr, r.stderr
    result = materialize_all(spec_path)
    assert result.success
    meta = _shard_meta(result)
    assert meta["run_shards_built"] == 1 and meta["run_files_rewritten"] == 1
    assert meta["run_shards_unchanged"] == len(rows) - 1
    # A file that is no longer the one recorded takes its bucket off the digest path.
    assert meta["run_buckets_unchanged"] == meta["run_buckets"] - 1
    assert _check_meta(result, "export_verifies")["shards_read"] == 1
    assert (export / rel).read_bytes() == before[rel][2]
    verify_export(export)

    # The same with size and mtime restored: the file looks like the one the build recorded, so
    # the build does not read it; the full `bucket-assets verify` re-hashes every shard and names it.
    _tamper(export / rel, restore_mtime=True)
    assert materialize_all(spec_path).success
    r = run_cli("verify", str(export))
    assert r.returncode == 1, r.stdout
    assert f"{rel}: sha256 differs from the manifest" in r.stderr, r.stderr


def test_a_shard_file_replaced_or_removed_is_rebuilt(built):
    spec_path, export, _, _ = built
    rows = _shard_files(spec_path)
    before = _files(export)
    gone, copied = rows[0][2], rows[-1][2]
    (export / gone).unlink()
    # A copy with the same bytes and mtime is another file (inode): compared, found equal, kept.
    tmp = export / "copy.tmp"
    shutil.copy2(export / copied, tmp)
    os.replace(tmp, export / copied)
    result = materialize_all(spec_path)
    assert result.success
    meta = _shard_meta(result)
    assert meta["run_shards_built"] == 2 and meta["run_files_rewritten"] == 1
    after = _files(export)
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in before.items()}
    # The next build knows both files again.
    again = materialize_all(spec_path)
    assert _shard_meta(again)["run_shards_built"] == 0
    verify_export(export)


def test_fingerprints_and_shards_are_the_same_with_1_and_n_workers(make_spec):
    one = make_spec("w1", **{"shards.max_samples": 4, "image.workers": 1})
    two = make_spec("w2", **{"shards.max_samples": 4, "image.workers": 2})
    assert materialize_all(one).success and materialize_all(two).success
    fields = lambda rows: [r[:9] for r in rows]  # noqa: E731 - all but the file identity
    assert fields(_shard_files(one)) == fields(_shard_files(two))
    a, b = Path(load_spec(one).output_dir), Path(load_spec(two).output_dir)
    assert {k: v[2] for k, v in _files(a).items()} == {k: v[2] for k, v in _files(b).items()}


class JsonChunkCompute:
    """What CeleryCompute does to the shard plans, without a broker: chunks of `chunk` plans
    JSON-encoded by the registered codec, run by distributed.run_chunk, results JSON-decoded, in
    order; the plans are read ahead by up to `window` chunks."""

    def __init__(self, chunk: int, window: int = 3):
        self.chunk, self.window = chunk, window

    def map(self, name, items):
        import collections

        from bucket_assets.core.parallel import _chunks
        from bucket_assets.distributed import FUNCTIONS, run_chunk

        _run, enc, _dec = FUNCTIONS[name]()
        pending = collections.deque()
        for c in _chunks(items, self.chunk):
            pending.append(json.loads(json.dumps([enc(x) for x in c])))
            if len(pending) >= self.window:
                yield from json.loads(json.dumps(run_chunk(name, pending.popleft())))
        while pending:
            yield from json.loads(json.dumps(run_chunk(name, pending.popleft())))


def _store_rows(store: Path, buckets: dict[str, int]) -> list[dict]:
    """Plan rows over a pack of fake JPEG bytes (write_buckets does not decode them)."""
    import hashlib

    store.mkdir(parents=True, exist_ok=True)
    pack = store / "pack-1-test.bin"
    rows, offset = [], 0
    with open(pack, "wb") as f:
        for bucket, n in sorted(buckets.items()):
            for i in range(n):
                data = bytes([i % 251]) * (300 + 97 * i)
                f.write(data)
                rows.append({
                    "bucket_id": bucket, "key": f"k{i:04d}", "image_id": f"{bucket}-{i}", "path": str(pack),
                    "pack_offset": offset, "jpg_bytes": len(data), "jpg_sha256": hashlib.sha256(data).hexdigest(),
                    "text": f"caption {bucket} {i}", "caption_variant": "alt_text", "caption_selector_index": 0,
                    "caption_source_id": 1, "source": "s", "src_w": 64, "src_h": 64, "target_w": 32, "target_h": 32,
                    "url": None, "similarity": None, "nsfw": None, "license": None,
                })
                offset += len(data)
    return rows


def _publish_staged(out: Path, run) -> None:
    from bucket_assets.core.publish import publish

    publish(out, [(r["path"], r["sha256"]) for r in run.rows], "manifest.json", "{}\n")


def test_write_buckets_is_the_same_on_a_chunked_json_engine_and_skips_what_it_recorded(tmp_path):
    from bucket_assets.core.publish import file_identity
    from bucket_assets.core.shard_writer import write_buckets
    from bucket_assets.distributed import LocalCompute

    rows = _store_rows(tmp_path / "store", {"p32x32": 11, "p64x32": 1, "p32x64": 7})
    buckets = ["p32x32", "p32x64", "p64x32", "p96x32"]  # the last one is empty
    local = write_buckets(tmp_path / "a", buckets, iter(rows), {}, 3, 10**9, LocalCompute(1))
    chunked = write_buckets(tmp_path / "b", buckets, iter(rows), {}, 3, 10**9, JsonChunkCompute(2))
    ident = lambda run: [{k: v for k, v in r.items() if k not in ("file_size", "mtime_ns", "inode")} for r in run.rows]  # noqa: E731
    assert ident(local) == ident(chunked)
    assert [(r["bucket_id"], r["shard_index"], r["samples"]) for r in local.rows] == [
        ("p32x32", 0, 3), ("p32x32", 1, 3), ("p32x32", 2, 3), ("p32x32", 3, 2), ("p32x64", 0, 3), ("p32x64", 1, 3),
        ("p32x64", 2, 1), ("p64x32", 0, 1)]
    assert local.built == chunked.built == 8 and local.rewritten == 8 and local.unchanged == 0
    for out, run in ((tmp_path / "a", local), (tmp_path / "b", chunked)):
        _publish_staged(out, run)
        for r in run.rows:  # the identity recorded at staging is the published file's
            assert file_identity(out / r["path"]) == (r["file_size"], r["mtime_ns"], r["inode"])
    assert _files(tmp_path / "a").keys() == _files(tmp_path / "b").keys()
    assert all(_files(tmp_path / "a")[k][2] == v[2] for k, v in _files(tmp_path / "b").items())

    # Recorded: nothing is built or read (the store pack may even be gone).
    recorded = {(r["bucket_id"], r["shard_index"]): r for r in local.rows}
    (tmp_path / "store" / "pack-1-test.bin").rename(tmp_path / "store" / "moved.bin")
    again = write_buckets(tmp_path / "a", buckets, iter(rows), recorded, 3, 10**9, JsonChunkCompute(2))
    assert (again.unchanged, again.built, again.rewritten) == (8, 0, 0)
    assert again.rows == local.rows
    (tmp_path / "store" / "moved.bin").rename(tmp_path / "store" / "pack-1-test.bin")

    # One caption changed: that shard only, staged without reading the published file.
    changed = [dict(r) for r in rows]
    changed[4]["text"] = "another caption"
    one = write_buckets(tmp_path / "a", buckets, iter(changed), recorded, 3, 10**9, JsonChunkCompute(2))
    assert (one.unchanged, one.built, one.rewritten) == (7, 1, 1)
    diff = [(a["bucket_id"], a["shard_index"]) for a, b in zip(one.rows, local.rows) if a != b]
    assert diff == [("p32x32", 1)]


def test_write_buckets_refuses_a_plan_out_of_bucket_order(tmp_path):
    from bucket_assets.core.shard_writer import write_buckets

    rows = _store_rows(tmp_path / "store", {"p32x32": 2, "p32x64": 2})
    with pytest.raises(ValueError, match="out of order"):
        write_buckets(tmp_path / "a", ["p32x32", "p32x64"], iter(rows[:1] + rows[2:] + rows[1:2]), {}, 3, 10**9)
    with pytest.raises(ValueError, match="not requested"):
        write_buckets(tmp_path / "a", ["p32x32"], iter(rows), {}, 3, 10**9)


def _lazy_rows(pack: Path, n: int):
    """n plan rows of one bucket over a pack of n 300-byte records, made as they are read."""
    import hashlib

    with open(pack, "wb") as f:
        for i in range(n):
            f.write(i.to_bytes(4, "big") * 75)

    def rows():
        for i in range(n):
            data = i.to_bytes(4, "big") * 75
            yield {"bucket_id": "p32x32", "key": f"k{i:07d}", "image_id": f"i{i}", "path": str(pack), "pack_offset": 300 * i,
                   "jpg_bytes": 300, "jpg_sha256": hashlib.sha256(data).hexdigest(), "text": f"caption {i}",
                   "caption_variant": "alt_text", "caption_selector_index": 0, "caption_source_id": 1, "source": "s",
                   "src_w": 64, "src_h": 64, "target_w": 32, "target_h": 32, "url": None, "similarity": None,
                   "nsfw": None, "license": None}

    return rows


def test_write_buckets_memory_follows_the_shard_not_the_bucket(tmp_path):
    import tracemalloc

    from bucket_assets.core.shard_writer import write_buckets

    peaks = {}
    for n in (2_000, 20_000):
        rows = _lazy_rows(tmp_path / f"pack-{n}.bin", n)
        out = tmp_path / f"out-{n}"
        tracemalloc.start()
        run = write_buckets(out, ["p32x32"], rows(), {}, 500, 10**9)
        _size, peaks[n] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert run.built == n // 500 and sum(r["samples"] for r in run.rows) == n
    # Ten times the samples: the peak stays near one shard's samples (the 36 more shard rows
    # are about 1.5 kB each), far below what a list of the bucket's samples would take (each
    # sample's .txt and .json alone are over 300 bytes).
    assert peaks[20_000] < 1.5 * peaks[2_000], peaks
    assert peaks[20_000] < 20_000 * 100, peaks


def test_a_work_dir_from_before_fingerprints_compares_once_then_skips(built):
    spec_path, export, _, _ = built
    before = _files(export)
    con = duckdb.connect(str(load_spec(spec_path).db_path))
    try:
        for col in ("fingerprint", "first_key", "last_key", "file_size", "mtime_ns", "inode"):
            con.execute(f"ALTER TABLE shard_files DROP COLUMN {col}")
        con.execute("ALTER TABLE shard_samples DROP COLUMN caption_source_id")
    finally:
        con.close()
    result = materialize_all(spec_path)
    assert result.success
    meta = _shard_meta(result)
    # Every shard is built and compared with its published file, which holds the same bytes.
    assert meta["run_shards_built"] == len(before) and meta["run_files_rewritten"] == 0
    assert _files(export) == before
    assert all(r[6] and r[11] for r in _shard_files(spec_path))
    assert _shard_meta(materialize_all(spec_path))["run_shards_unchanged"] == len(before)


def test_verify_trusts_each_shards_own_jpegs_streamed_in_manifest_order(built, monkeypatch):
    """export_verifies' trusted JPEGs come per shard (TrustedJpegs), not as one set of the
    dataset's: each shard gets exactly the sha256 of its .jpg members, a shard asked out of
    order or not recorded gets none (it is decoded), nothing is written before the first call,
    and the file goes on exit. Verifying with it decodes no JPEG; the check reports it."""
    import hashlib

    import bucket_assets.core.manifest as manifest_mod
    from bucket_assets.core.db import connect
    from bucket_assets.core.shard_writer import TrustedJpegs

    spec_path, export, work, _ = built
    spec = load_spec(spec_path)
    manifest = json.loads((export / "manifest.json").read_text())
    order = [(b, sh["path"]) for b, entry in sorted(manifest["buckets"].items()) for sh in entry["shards"]]
    assert len(order) > 3
    own = {rel: frozenset(hashlib.sha256(parts["jpg"]).hexdigest() for _, parts in read_shard(export / rel))
           for _, rel in order}
    db = lambda: connect(spec.db_path)  # noqa: E731
    with TrustedJpegs(db, work / "tmp", "t1") as trusted:
        assert not trusted.path.exists()  # nothing written before the first call
        got = {rel: trusted(b, rel) for b, rel in order}
        assert trusted.path.exists()
    assert got == own and not trusted.path.exists()
    with TrustedJpegs(db, work / "tmp", "t2") as trusted:
        (b1, r1), (b2, r2), (b3, r3) = order[0], order[1], order[2]
        assert trusted(b2, r2) == own[r2]
        assert trusted(b1, r1) == frozenset()  # behind the cursor: decoded instead
        assert trusted(b2, r2[:-4] + "a.tar") == frozenset()  # not recorded
        assert trusted(b3, r3) == own[r3]
    decoded = []
    real = manifest_mod.jpeg_decodes
    monkeypatch.setattr(manifest_mod, "jpeg_decodes", lambda data: decoded.append(1) or real(data))
    with TrustedJpegs(db, work / "tmp", "t3") as trusted:
        rep = verify_export(export, None, trusted)
    assert rep.reverified == len(order) and decoded == []
    verify_export(export)
    assert len(decoded) == rep.samples  # the CLI's way decodes every one
