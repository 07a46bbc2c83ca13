"""The store's lifecycle (core/store.py): what to render decided in DuckDB, rows moved in
bounded batches, compaction from streamed rows, pruning, a killed run's journal."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tracemalloc
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bucket_assets.core.db import connect, set_table_version
from bucket_assets.core.processing import (
    JOURNAL_NAME,
    PROCESSED_SCHEMA,
    RenderParams,
    RenderTask,
    StoreReader,
    close_store_packs,
    is_pack,
    journal_path,
    needs_compaction,
    render,
)
from bucket_assets.core.store import (
    BATCH_ROWS,
    FINGERPRINT_SQL,
    STAGING_PREFIX,
    PLAN_INPUTS,
    ImageStore,
    fingerprint_params,
    packs_on_disk,
)
from bucket_assets_tests.conftest import CountingConnection

PARAMS = RenderParams("reencode_jpeg", 90, "adaptive_scale", 0.85, 10**8)
BUCKETS = ["p32x24", "p24x32"]


@pytest.fixture(autouse=True)
def _close_packs():
    yield
    close_store_packs()


class Inline:
    """engine.map on this process; records that it was handed a stream, not a list."""

    def __init__(self, fn=render, on_pull=None):
        self.fn, self.on_pull, self.rendered = fn, on_pull, 0

    def map(self, name, items):
        assert name == "render" and not isinstance(items, (list, tuple))
        for t in items:
            if self.on_pull is not None:
                self.on_pull(t)
            self.rendered += 1
            yield self.fn(t)


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Fixture:
    """A metadata DB with the plan's inputs (raw_index, filtered_images, bucket_assignments) for
    `n` small JPEGs per bucket, and a store over it."""

    def __init__(self, tmp_path: Path, n: int = 7, batch_rows: int = 3):
        self.root = tmp_path
        self.db = tmp_path / "work" / "metadata.duckdb"
        self.processed = tmp_path / "work" / "processed"
        src = tmp_path / "src"
        src.mkdir()
        raw, assign = [], []
        for bi, b in enumerate(BUCKETS):
            tw, th = (32, 24) if bi == 0 else (24, 32)
            for i in range(n):
                image_id = f"img{bi}_{i:03d}"
                data = _jpeg(2 * tw, 2 * th, 100 * bi + i)
                path = src / f"{image_id}.jpg"
                path.write_bytes(data)
                raw.append((len(raw), image_id, hashlib.sha256(data).hexdigest(), str(path), 2 * tw, 2 * th))
                assign.append((image_id, b, image_id, 0.5, tw, th, tw, th))
        with self.con() as con:
            con.execute("CREATE TABLE raw_index (row_id BIGINT, sha256 VARCHAR, location VARCHAR, member VARCHAR, "
                        "data_offset BIGINT, byte_size BIGINT, orientation INTEGER, width INTEGER, height INTEGER)")
            con.executemany("INSERT INTO raw_index VALUES (?, ?, ?, NULL, NULL, NULL, NULL, ?, ?)",
                            [(r, sha, loc, w, h) for r, _, sha, loc, w, h in raw])
            con.execute("CREATE TABLE filtered_images (image_id VARCHAR, row_id BIGINT, decision VARCHAR)")
            con.executemany("INSERT INTO filtered_images VALUES (?, ?, 'keep')", [(i, r) for r, i, *_ in raw])
            con.execute("CREATE TABLE bucket_assignments (image_id VARCHAR, bucket_id VARCHAR, key VARCHAR, "
                        "status VARCHAR, scale DOUBLE, resized_w INTEGER, resized_h INTEGER, crop_left INTEGER, "
                        "crop_top INTEGER, target_w INTEGER, target_h INTEGER)")
            con.executemany("INSERT INTO bucket_assignments VALUES (?, ?, ?, 'ok', ?, ?, ?, 0, 0, ?, ?)", assign)
        self.store = ImageStore(self.processed, tmp_path / "work" / "tmp", self.con, batch_rows=batch_rows)

    def con(self):
        return connect(self.db)

    def build(self, params: RenderParams = PARAMS, buckets=BUCKETS, engine=None, token: str = "t"):
        engine = engine or Inline()
        with self.store.run(buckets, params, token) as run:
            run.render(engine)
            return run.finish(), engine.rendered

    def rows(self, bucket: str | None = None) -> dict[str, dict]:
        with self.con() as con:
            t = con.execute("SELECT * FROM processed_images WHERE $b IS NULL OR bucket_id = $b ORDER BY bucket_id, key",
                            {"b": bucket}).to_arrow_table()
        return {f"{r['bucket_id']}/{r['key']}": r for r in t.to_pylist()}

    def sql(self, q: str, params=None):
        with self.con() as con:
            return con.execute(q, params or []).fetchall()


def _read(row: dict) -> bytes:
    with StoreReader() as r:
        return r.read(row["path"], row["pack_offset"], row["bytes"])


def test_a_rebuild_reuses_every_row_and_its_record(tmp_path):
    f = Fixture(tmp_path)
    done, n = f.build()
    assert n == 14 and (done.samples, done.rendered, done.reused, done.buckets_rendered) == (14, 14, 0, 2)
    assert [(b.bucket_id, b.samples, b.rendered, b.statuses) for b in done.buckets] == [
        ("p32x24", 7, 7, (("ok", 7),)), ("p24x32", 7, 7, (("ok", 7),))]
    first = f.rows()
    assert all(hashlib.sha256(_read(r)).hexdigest() == r["sha256"] for r in first.values())
    packs = sorted(p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b))

    done, n = f.build()
    assert n == 0 and (done.samples, done.rendered, done.reused, done.buckets_rendered) == (14, 0, 14, 0)
    assert f.rows() == first
    assert sorted(p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b)) == packs
    assert not list(f.processed.glob(f"*/{JOURNAL_NAME}"))
    assert not list((tmp_path / "work" / "tmp").glob(f"{STAGING_PREFIX}*"))


def test_a_no_op_stages_nothing_to_render_or_keep_and_commits_nothing(tmp_path):
    """A rebuild whose committed rows all stand writes no kept or todo rows and commits nothing
    (a marker in a result column survives); a row under a new id, or a table of an older
    version, takes the full path and is rewritten."""
    f = Fixture(tmp_path)
    f.build()
    f.sql("UPDATE processed_images SET error = 'marker' WHERE key = 'img0_000'")
    with f.store.run(BUCKETS, PARAMS, "t") as run:
        assert run.unchanged and (run.samples, run.to_render) == (14, 0)
        assert not any(p.exists() for p in (run.kept, run.todo, run.results))
        run.render(Inline())
        done = run.finish()
    assert (done.samples, done.rendered) == (14, 0)
    assert f.rows()["p32x24/img0_000"]["error"] == "marker"  # not rewritten

    # The same key and fingerprint under another image id: reused, but the row is rewritten.
    f.sql("UPDATE processed_images SET image_id = 'someone_else' WHERE key = 'img0_001'")
    with f.store.run(BUCKETS, PARAMS, "t") as run:
        assert not run.unchanged and run.to_render == 0
        run.render(Inline())
        run.finish()
    rows = f.rows()
    assert rows["p32x24/img0_001"]["image_id"] == "img0_001" and rows["p32x24/img0_000"]["error"] == "marker"


def test_a_no_op_by_version_runs_no_plan_and_anything_that_changes_the_plan_does(tmp_path):
    """With versioned plan inputs, a bucket whose committed rows and packs are as recorded is
    not planned at all (no decided file); a new input version, other settings, a pack cut
    short, a stray pack, a deleted row or a killed run's journal each take the full plan."""
    f = Fixture(tmp_path)
    f.build()

    def planned(params=PARAMS) -> bool:
        with f.store.run(BUCKETS, params, "t") as run:
            ran = run.decided.exists()
            assert (ran or run.unchanged) and (run.samples, run.to_render) == (14, 0), (ran, run.samples, run.to_render)
            run.render(Inline())
            run.finish()
        return ran

    assert planned() is True and planned() is True  # inputs without versions: always planned
    with f.con() as con:
        for t in PLAN_INPUTS:
            set_table_version(con, t, f"{t}-v1")
    assert planned() is True  # no version recorded yet: planned once, then recorded
    assert planned() is False and planned() is False
    rows = f.rows()
    with f.con() as con:
        set_table_version(con, "filtered_images", "filtered_images-v2")
    assert planned() is True and planned() is False
    with f.store.run(BUCKETS, RenderParams("reencode_jpeg", 80, "adaptive_scale", 0.85, 10**8), "t") as run:
        assert not run.unchanged and run.to_render == 14
    (pack, size), = packs_on_disk(f.processed, "p24x32")
    with open(pack, "r+b") as fh:
        fh.truncate(size - 1)
    with f.store.run(BUCKETS, PARAMS, "t") as run:
        assert not run.unchanged and run.to_render == 1
        run.render(Inline())
        run.finish()
    assert planned() is False
    stray = f.processed / "p32x24" / "pack-1-deadbeef0000.bin"
    stray.write_bytes(b"left by a killed run")
    assert planned() is True and not stray.exists() and planned() is False
    f.sql("DELETE FROM processed_images WHERE key = 'img0_003'")
    with f.store.run(BUCKETS, PARAMS, "t") as run:
        assert not run.unchanged and run.to_render == 1
        run.render(Inline())
        run.finish()
    assert planned() is False
    journal_path(f.processed, "p32x24").write_text("")
    assert planned() is True and planned() is False
    assert {k: {c: v for c, v in r.items() if c not in ("path", "pack_offset")} for k, r in f.rows().items()} == {
        k: {c: v for c, v in r.items() if c not in ("path", "pack_offset")} for k, r in rows.items()}


def test_a_rebuild_that_adds_and_removes_samples_writes_only_those_rows(tmp_path):
    """The commit leaves every committed row the plan keeps as it is in place: only the removed
    sample's row is deleted and only the new sample's row is inserted."""
    from contextlib import contextmanager

    f = Fixture(tmp_path)
    f.build()
    before = f.rows()
    data = _jpeg(64, 48, 999)
    src = tmp_path / "src" / "img0_new.jpg"
    src.write_bytes(data)
    f.sql("INSERT INTO raw_index VALUES (100, ?, ?, NULL, NULL, NULL, NULL, 64, 48)",
          [hashlib.sha256(data).hexdigest(), str(src)])
    f.sql("INSERT INTO filtered_images VALUES ('img0_new', 100, 'keep')")
    f.sql("INSERT INTO bucket_assignments VALUES ('img0_new', 'p32x24', 'img0_new', 'ok', 0.5, 32, 24, 0, 0, 32, 24)")
    f.sql("UPDATE filtered_images SET decision = 'too_small' WHERE image_id = 'img1_003'")
    log: list = []

    @contextmanager
    def counting():
        with f.con() as con:
            yield CountingConnection(con, log, "processed_images")

    f.store.connect = counting
    done, n = f.build()
    assert n == 1 and done.samples == 14 and [b.rendered for b in done.buckets] == [1, 0]
    assert log == [("DELETE", 1), ("INSERT", 1)]
    after = f.rows()
    assert set(after) == set(before) - {"p24x32/img1_003"} | {"p32x24/img0_new"}
    assert all(after[k] == before[k] for k in after if k in before)
    assert hashlib.sha256(_read(after["p32x24/img0_new"])).hexdigest() == after["p32x24/img0_new"]["sha256"]
    # Everything rendered again (another quality): every row is replaced.
    log.clear()
    done, n = f.build(RenderParams("reencode_jpeg", 80, "adaptive_scale", 0.85, 10**8))
    assert n == 14 and log == [("DELETE", 14), ("INSERT", 14)]


def test_changed_fingerprints_render_again(tmp_path):
    f = Fixture(tmp_path)
    f.build()
    before = f.rows()
    # New source bytes for one sample (its raw sha256), a new crop for another.
    f.sql("UPDATE raw_index SET sha256 = repeat('0', 64) WHERE location LIKE '%img0_002.jpg'")
    f.sql("UPDATE bucket_assignments SET target_w = 30, resized_w = 32 WHERE key = 'img1_004'")
    done, n = f.build()
    assert n == 2 and [b.rendered for b in done.buckets] == [1, 1]
    after = f.rows()
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"p32x24/img0_002", "p24x32/img1_004"}
    assert after["p24x32/img1_004"]["width"] == 30
    # Other image parameters change every fingerprint.
    done, n = f.build(RenderParams("reencode_jpeg", 80, "adaptive_scale", 0.85, 10**8))
    assert n == 14


def test_a_missing_or_truncated_pack_renders_what_it_lost(tmp_path):
    f = Fixture(tmp_path)
    f.build()
    before = f.rows()
    (pack_a,) = packs_on_disk(f.processed, "p32x24")
    os.unlink(pack_a[0])  # every record of the bucket is gone
    (pack_b, size_b) = packs_on_disk(f.processed, "p24x32")[0]
    in_b = sorted((r for r in before.values() if r["bucket_id"] == "p24x32"), key=lambda r: r["pack_offset"])
    cut = in_b[4]["pack_offset"] + in_b[4]["bytes"] - 1  # the 5th record loses its last byte
    with open(pack_b, "r+b") as fh:
        fh.truncate(cut)
    done, n = f.build()
    assert [b.rendered for b in done.buckets] == [7, 3] and n == 10  # the 5th to 7th records are cut
    after = f.rows()
    kept_b = {f"p24x32/{r['key']}" for r in in_b[:4]}
    assert {k for k in after if after[k] == before[k]} == kept_b
    # The truncated pack is still referenced by the 4 whole records; nothing else is left.
    assert {p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b)} == {r["path"] for r in after.values()}
    for r in after.values():
        assert hashlib.sha256(_read(r)).hexdigest() == r["sha256"]


def test_a_killed_runs_journal_is_reused_and_preferred(tmp_path):
    f = Fixture(tmp_path)
    f.build()
    committed = f.rows()
    f.sql("UPDATE raw_index SET sha256 = repeat('1', 64) WHERE location LIKE '%img0_00%'")  # all of bucket 0
    # A run that renders and is killed before its commit: the journal holds its rows.
    with f.store.run(BUCKETS, PARAMS, "killed") as run:
        assert run.to_render == 7
        run.render(Inline())
    journaled = {}
    for line in journal_path(f.processed, "p32x24").read_text().splitlines():
        r = json.loads(line)
        journaled[f"p32x24/{r['key']}"] = r
    assert len(journaled) == 7 and f.rows() == committed
    with open(journal_path(f.processed, "p32x24"), "a") as fh:
        fh.write('{"key": "img0_000", "bucket_id": "p32x24", "status": "ok", "pa')  # torn by the kill
    # A later row for one key wins over an earlier one; a row of another fingerprint is not reused.
    with open(journal_path(f.processed, "p24x32"), "a") as fh:
        fh.write(json.dumps({**committed["p24x32/img1_003"], "fingerprint": "0" * 64}) + "\n")

    done, n = f.build(engine=Inline(on_pull=lambda t: pytest.fail(f"rendered {t.key} again")))
    assert n == 0 and done.rendered == 0
    after = f.rows()
    for k, r in journaled.items():
        assert {c: after[k][c] for c in r} == r  # the journaled record, as it was
    assert {k: after[k] for k in after if k.startswith("p24x32/")} == {
        k: v for k, v in committed.items() if k.startswith("p24x32/")}
    assert not list(f.processed.glob(f"*/{JOURNAL_NAME}"))
    # The killed run's pack is referenced now; the old one of bucket 0 was pruned.
    assert {p for p, _ in packs_on_disk(f.processed, "p32x24")} == {r["path"] for r in journaled.values()}


def test_a_journaled_row_of_a_new_fingerprint_is_rendered_again(tmp_path):
    f = Fixture(tmp_path)
    with f.store.run(BUCKETS, PARAMS, "killed") as run:
        run.render(Inline())  # killed before its commit
    done, n = f.build(RenderParams("reencode_jpeg", 70, "adaptive_scale", 0.85, 10**8))
    assert n == 14 and len(f.rows()) == 14


def test_the_plan_and_results_move_in_bounded_batches(tmp_path):
    """With 3 rows a batch: the plan is read back and the results written in batches, each
    result is journaled before the next task is read, and the engine gets a stream."""
    f = Fixture(tmp_path, n=7, batch_rows=3)
    seen = []

    def pulled(task):
        # Every result of the tasks read before this one is journaled already.
        lines = sum(len(journal_path(f.processed, b).read_text().splitlines())
                    for b in BUCKETS if journal_path(f.processed, b).exists())
        seen.append((task.key, lines, (task.location, task.data_offset or 0)))

    with f.store.run(BUCKETS, PARAMS, "t") as run:
        # DuckDB writes row groups of whole 2048-row vectors: reading one back holds at most that.
        todo = pq.ParquetFile(run.todo).metadata
        assert todo.num_rows == 14 and todo.num_row_groups == 1
        run.render(Inline(on_pull=pulled))
        res = pq.ParquetFile(run.results).metadata
        groups = [res.row_group(i).num_rows for i in range(res.num_row_groups)]
        assert groups == [3, 3, 3, 3, 2]
        assert pq.read_schema(run.results).equals(PROCESSED_SCHEMA)
        done = run.finish()
    assert [lines for _, lines, _ in seen] == list(range(14))
    # In source order (file, then offset), not bucket by bucket: files are read front to back.
    where = [w for _, _, w in seen]
    assert where == sorted(where) and len(set(where)) == 14
    assert done.samples == 14 and len(f.rows()) == 14


def _failed(task: RenderTask) -> dict:
    """A result without pixels (no pack write): what a read error returns."""
    return {**{c: None for c in PROCESSED_SCHEMA.names}, "image_id": task.image_id, "bucket_id": task.bucket_id,
            "key": task.key, "fingerprint": task.fingerprint(), "status": "read_error", "error": "x" * 40}


def _synthetic(tmp_path: Path, n: int, batch_rows: int) -> ImageStore:
    db = tmp_path / "work" / "metadata.duckdb"
    with connect(db) as con:
        con.execute("""CREATE TABLE raw_index AS SELECT i AS row_id, sha256(i::VARCHAR) AS sha256,
                       '/nonexistent/' || i || '.jpg' AS location, NULL::VARCHAR AS member, NULL::BIGINT AS data_offset,
                       NULL::BIGINT AS byte_size, NULL::INTEGER AS orientation, 64 AS width, 48 AS height
                       FROM range(?) t(i)""", [n])
        con.execute("CREATE TABLE filtered_images AS SELECT 'id' || row_id AS image_id, row_id, 'keep' AS decision FROM raw_index")
        con.execute("""CREATE TABLE bucket_assignments AS SELECT 'id' || row_id AS image_id,
                       CASE WHEN row_id % 2 = 0 THEN 'p32x24' ELSE 'p24x32' END AS bucket_id, 'id' || row_id AS key,
                       'ok' AS status, 0.5 AS scale, 32 AS resized_w, 24 AS resized_h, 0 AS crop_left, 0 AS crop_top,
                       32 AS target_w, 24 AS target_h FROM raw_index""")
    return ImageStore(tmp_path / "work" / "processed", tmp_path / "work" / "tmp", lambda: connect(db), batch_rows)


def _python_peak(store: ImageStore) -> tuple[int, int]:
    """Peak Python allocation of a clean build and of a no-op rebuild (results without pixels)."""
    peaks = []
    for _ in range(2):
        tracemalloc.start()
        try:
            with store.run(BUCKETS, PARAMS, "t") as run:
                run.render(Inline(_failed))
                done = run.finish()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert done.reused == done.samples
    return peaks[0], peaks[1]


def test_python_memory_does_not_follow_the_dataset(tmp_path):
    """Plan, render and commit hold batches, never the dataset: ten times the samples leave the
    Python peak about where it was (it held ~3.7 KB per sample before)."""
    small = _python_peak(_synthetic(tmp_path / "small", 1000, 256))
    large = _python_peak(_synthetic(tmp_path / "large", 10_000, 256))
    for s, l in zip(small, large):
        assert l < 1.5 * s + 200_000, (small, large)  # a dict per sample would add ~10 MB


def test_plan_and_commit_spill_under_the_smallest_duckdb_cap(tmp_path):
    """80,000 samples need more than DuckDB's 64 MB (the spec's smallest metadata.memory_limit)
    to plan and commit in memory: they spill instead of failing."""
    store = _synthetic(tmp_path, 80_000, BATCH_ROWS)
    db = tmp_path / "work" / "metadata.duckdb"
    store.connect = lambda: connect(db, "64MB")
    for rendered in (80_000, 0):
        with store.run(BUCKETS, PARAMS, "t") as run:
            run.render(Inline(_failed))
            done = run.finish()
        assert (done.samples, done.rendered) == (80_000, rendered)


def test_compaction_copies_streamed_rows_in_key_order(tmp_path):
    f = Fixture(tmp_path, n=7, batch_rows=2)
    f.build()
    before = f.rows()
    (pack, size), = packs_on_disk(f.processed, "p32x24")
    with open(pack, "ab") as fh:
        fh.write(b"\0" * (3 * size))  # garbage: the bucket's pack is now mostly not live
    other = {p for p, _ in packs_on_disk(f.processed, "p24x32")}
    stray = f.processed / "p24x32" / "pack-1-deadbeef0000.bin"
    stray.write_bytes(b"left by a killed run")
    (f.processed / "p24x32" / ".tmp-pack.1.2").write_bytes(b"temp")

    done, n = f.build()
    assert n == 0 and done.rendered == 0
    after = f.rows()
    a = [after[k] for k in sorted(after) if k.startswith("p32x24/")]
    assert len({r["path"] for r in a}) == 1 and a[0]["path"] != pack
    offsets, o = [], 0
    for r in a:  # one new pack, records in key order, back to back
        offsets.append(o)
        o += r["bytes"]
    assert [r["pack_offset"] for r in a] == offsets and os.path.getsize(a[0]["path"]) == o
    for k, r in after.items():
        assert {c: v for c, v in r.items() if c not in ("path", "pack_offset")} == {
            c: v for c, v in before[k].items() if c not in ("path", "pack_offset")}
        assert hashlib.sha256(_read(r)).hexdigest() == r["sha256"]
    # The old pack, the stray pack and the temp file are pruned; the other bucket is untouched.
    assert {p for p, _ in packs_on_disk(f.processed, "p32x24")} == {a[0]["path"]}
    assert sorted(os.listdir(f.processed / "p24x32")) == sorted(os.path.basename(p) for p in other)
    assert {k: after[k] for k in after if k.startswith("p24x32/")} == {
        k: v for k, v in before.items() if k.startswith("p24x32/")}


def test_a_full_re_render_compacts_nothing_and_a_stray_pack_is_pruned(tmp_path):
    """Packs no live record points into are pruned whole, so they do not make a bucket due for
    compaction: a rebuild at a lower quality (new records smaller than the old packs) copies
    nothing. A stray pack alone makes an otherwise no-op build commit, and the prune removes it."""
    f = Fixture(tmp_path)
    f.build()
    old = {p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b)}
    low = RenderParams("reencode_jpeg", 20, "adaptive_scale", 0.85, 10**8)
    with f.store.run(BUCKETS, low, "t") as run:
        run.render(Inline())
        written = {p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b)} - old
        new_bytes = sum(os.path.getsize(p) for p in written)
        # Counting every pack on disk, replaced records would fill more than half of them.
        assert needs_compaction(new_bytes, new_bytes + sum(os.path.getsize(p) for p in old), len(old) + len(written))
        assert run.compact() == []
        done = run.commit()
    assert done.rendered == 14
    assert {p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b)} == written == {r["path"] for r in f.rows().values()}

    stray = f.processed / "p24x32" / "pack-1-deadbeef0000.bin"
    stray.write_bytes(b"left by a killed run")
    with f.store.run(BUCKETS, low, "t") as run:
        assert not run.unchanged and run.to_render == 0
        run.render(Inline())
        assert run.compact() == []
        run.commit()
    assert not stray.exists() and {p for b in BUCKETS for p, _ in packs_on_disk(f.processed, b)} == written
    with f.store.run(BUCKETS, low, "t") as run:
        assert run.unchanged


def test_buckets_without_samples_and_gone_stores(tmp_path):
    f = Fixture(tmp_path, n=3)
    f.build()
    f.sql("DELETE FROM bucket_assignments WHERE bucket_id = 'p24x32'")
    done, n = f.build(buckets=BUCKETS + ["p16x16"])
    assert [(b.bucket_id, b.samples, b.statuses) for b in done.buckets] == [
        ("p32x24", 3, (("ok", 3),)), ("p24x32", 0, ()), ("p16x16", 0, ())]
    assert not (f.processed / "p24x32").exists()  # no row references its pack: the dir goes
    assert set(f.rows()) == {f"p32x24/img0_00{i}" for i in range(3)}
    # A bucket the spec no longer has: its whole store dir goes (export_manifest drops its rows).
    (f.processed / "r256_p16x16").mkdir()
    (f.processed / "not-a-bucket").mkdir()
    assert f.store.prune_gone_buckets({"p32x24", "p24x32"}) == ["r256_p16x16"]
    assert sorted(os.listdir(f.processed)) == ["not-a-bucket", "p32x24"]


def test_an_older_table_without_pack_offsets_renders_again(tmp_path):
    f = Fixture(tmp_path, n=2)
    f.build()
    f.sql("ALTER TABLE processed_images DROP COLUMN pack_offset")
    done, n = f.build()
    assert n == 4 and all(r["pack_offset"] is not None for r in f.rows().values())


def test_a_live_runs_staging_is_kept_a_dead_ones_removed(tmp_path):
    f = Fixture(tmp_path, n=1)
    tmp = tmp_path / "work" / "tmp"
    dead, live = tmp / f"{STAGING_PREFIX}dead", tmp / f"{STAGING_PREFIX}live"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / ".lock").touch()
    fd = os.open(live / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        f.build()
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("params", [
    PARAMS,
    RenderParams("reencode_jpeg", 95, "444", 0.5, 10**8, blank_std=2.5),
    RenderParams("reencode_jpeg", 95, "adaptive_scale", 0.85, 10**8, None, True),
    RenderParams("passthrough_jpeg", 95, "420", 1.0, 10**8, 0.1, True),
])
def test_sql_fingerprints_equal_render_task_fingerprints(params):
    rows = [("ab" * 32, 150, 100, 5, 2, 128, 96), (None, 1, 2, 0, 0, 1, 2), ("", 10**6, 7, 3, 0, 999, 7),
            ("x y!~#[]", 3, 3, 0, 0, 3, 3)]
    con = duckdb.connect()
    got = con.execute(
        f"""SELECT {FINGERPRINT_SQL} FROM (SELECT unnest($rows, recursive := true)) t
            (source_sha256, resized_w, resized_h, crop_left, crop_top, target_w, target_h)""",
        {"rows": [dict(zip("abcdefg", r)) for r in rows], **fingerprint_params(params)},
    ).fetchall()
    want = [RenderTask("i", "b", "k", r[0], "", None, None, None, 0.5, *r[1:], "", params).fingerprint() for r in rows]
    assert [g[0] for g in got] == want
    # A string json.dumps would escape gets no SQL fingerprint: rendered again, never wrongly reused.
    esc = con.execute(f"SELECT {FINGERPRINT_SQL} FROM (SELECT 'a\"b' AS source_sha256, 1 AS resized_w, 1 AS resized_h, "
                      "0 AS crop_left, 0 AS crop_top, 1 AS target_w, 1 AS target_h)", fingerprint_params(params)).fetchone()
    assert esc[0] is None
