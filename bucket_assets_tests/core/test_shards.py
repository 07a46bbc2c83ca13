"""Deterministic WebDataset shards: keys, sample JSON, shard planning, writing and reading."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import operator
import os
import tarfile

import pytest

from bucket_assets.core.shards import (
    BLOCK,
    RECORD,
    SAMPLE_JSON_KEYS,
    Sample,
    caption_txt,
    plan_shards,
    read_shard,
    sample_json,
    sample_key,
    sample_tar_bytes,
    tar_size,
    write_shard,
)

# sample_key ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["abc", "000123", "a_b-C", "x" * 80])
def test_sample_key_safe_ids_unchanged(image_id):
    assert sample_key(image_id) == image_id


def test_sample_key_unsafe_ids_sanitised_and_distinct():
    ids = ["a.b", "a_b", "a b", "a/b", "a\\b", "a.b.jpg", "dir/sub/img.0001", "dir/sub/img_0001", "ünï", "a..b", "a._b"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    for k in keys:
        assert "." not in k and "/" not in k and " " not in k
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in k)
        assert 0 < len(k) <= 80
    # the sanitised prefix stays readable
    assert sample_key("a.b").startswith("a_b-")
    assert sample_key("dir/sub/img.0001").startswith("dir_sub_img_0001-")


def test_sample_key_deterministic():
    assert sample_key("some/path/x.jpg") == sample_key("some/path/x.jpg")


def test_sample_key_long_ids_bounded_and_distinct():
    a = "x" * 200
    b = "x" * 199 + "y"
    c = "x" * 81
    keys = {sample_key(a), sample_key(b), sample_key(c)}
    assert len(keys) == 3
    assert all(len(k) <= 80 for k in keys)
    assert len(sample_key("é" * 300)) <= 80
    # key + ".json" fits a USTAR name field (100 bytes)
    assert len((sample_key("y/" * 100) + ".json").encode()) <= 100


def test_sample_key_never_collides_with_a_sanitised_key():
    other = "a_b-" + hashlib.sha256(b"a.b").hexdigest()[:12]
    assert sample_key("a.b") != sample_key(other)


# sample_json / caption_txt ------------------------------------------------------------------------------


def _meta(**kw) -> dict:
    m = {k: None for k in SAMPLE_JSON_KEYS}
    m.update(
        bucket_id="p1024x1024", image_id="img", source="src", src_w=800, src_h=800, target_w=512, target_h=512,
        caption_variant="alt_text", caption_selector_index=0, caption_source_id=1,
    )
    m.update(kw)
    return m


def test_sample_json_canonical():
    meta = _meta(similarity=0.25, url="http://x/é")
    data = sample_json(meta)
    assert json.loads(data) == meta
    assert list(json.loads(data)) == sorted(SAMPLE_JSON_KEYS)
    # same bytes regardless of insertion order
    assert sample_json(dict(reversed(list(meta.items())))) == data
    assert b" " not in data  # compact separators
    assert "é".encode("utf-8") in data  # not \u-escaped


def test_sample_json_rejects_missing_and_extra_keys():
    meta = _meta()
    del meta["license"]
    with pytest.raises(ValueError, match="license"):
        sample_json(meta)
    with pytest.raises(ValueError, match="bogus"):
        sample_json(_meta(bogus=1))


def test_caption_txt_newline_terminated():
    assert caption_txt("a cat") == b"a cat\n"
    assert caption_txt("a cat\n\n") == b"a cat\n"
    assert caption_txt("") == b"\n"
    assert caption_txt("café") == "café\n".encode("utf-8")


# write / read ---------------------------------------------------------------------------------------------


def _samples(n: int, jpg_size: int = 700) -> list[Sample]:
    out = []
    for i in range(n):
        key = f"k{i:03d}"
        out.append(
            Sample(
                key=key,
                jpg=bytes([i % 256]) * (jpg_size + i),
                txt=caption_txt(f"caption {i}"),
                json=sample_json(_meta(image_id=key)),
            )
        )
    return out


def test_write_shard_deterministic_bytes(tmp_path):
    a = write_shard(tmp_path / "a" / "shard-000000.tar", _samples(5))
    b = write_shard(tmp_path / "b" / "shard-000000.tar", _samples(5))
    da = (tmp_path / "a" / "shard-000000.tar").read_bytes()
    db = (tmp_path / "b" / "shard-000000.tar").read_bytes()
    assert da == db
    assert a.sha256 == b.sha256 == hashlib.sha256(da).hexdigest()
    assert a.bytes == len(da) and a.samples == 5 and a.rewritten


def test_write_shard_size_matches_planning_formula(tmp_path):
    for n, size in [(1, 10), (3, 511), (4, 512), (7, 5000)]:
        samples = _samples(n, size)
        sf = write_shard(tmp_path / f"s{n}.tar", samples)
        expected = tar_size(sum(s.tar_bytes for s in samples))
        assert sf.bytes == os.path.getsize(sf.path) == expected
        assert sf.bytes % RECORD == 0


def test_write_shard_identical_content_left_untouched(tmp_path):
    path = tmp_path / "shard-000000.tar"
    first = write_shard(path, _samples(3))
    st1 = os.stat(path)
    os.utime(path, ns=(st1.st_atime_ns, st1.st_mtime_ns - 5_000_000_000))  # make a rewrite detectable
    st1 = os.stat(path)
    second = write_shard(path, _samples(3))
    st2 = os.stat(path)
    assert second.rewritten is False
    assert (st2.st_ino, st2.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns)
    assert second.sha256 == first.sha256 and second.bytes == first.bytes and second.samples == 3
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]  # no temp file left


def test_write_shard_changed_content_is_replaced(tmp_path):
    path = tmp_path / "shard-000000.tar"
    first = write_shard(path, _samples(3))
    second = write_shard(path, _samples(4))
    assert second.rewritten and second.sha256 != first.sha256
    assert [k for k, _ in read_shard(path)] == ["k000", "k001", "k002", "k003"]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


def test_write_shard_failure_leaves_no_temp(tmp_path):
    def boom():
        yield _samples(1)[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "shard-000000.tar", boom())
    assert list(tmp_path.iterdir()) == []


def test_shard_headers_ustar_fixed_metadata(tmp_path):
    path = tmp_path / "shard-000000.tar"
    write_shard(path, _samples(2))
    raw = path.read_bytes()
    assert raw[257:263] == b"ustar\x00" and raw[263:265] == b"00"  # POSIX USTAR magic/version
    with tarfile.open(path, "r:") as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["k000.jpg", "k000.txt", "k000.json", "k001.jpg", "k001.txt", "k001.json"]
    for m in members:
        assert m.isreg()
        assert m.mtime == 0 and m.uid == 0 and m.gid == 0
        assert m.uname == "" and m.gname == ""
        assert m.mode == 0o644
        assert not m.pax_headers


def test_read_back_with_tarfile_and_read_shard(tmp_path):
    samples = _samples(3)
    path = tmp_path / "shard-000000.tar"
    write_shard(path, samples)
    with tarfile.open(path, "r") as tf:
        for s in samples:
            assert tf.extractfile(f"{s.key}.jpg").read() == s.jpg
            assert tf.extractfile(f"{s.key}.txt").read() == s.txt
            assert json.loads(tf.extractfile(f"{s.key}.json").read()) == json.loads(s.json)
    got = list(read_shard(path))
    assert got == [(s.key, {"jpg": s.jpg, "txt": s.txt, "json": s.json}) for s in samples]


def test_read_back_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = _samples(4)
    path = tmp_path / "shard-000000.tar"
    write_shard(path, samples)
    got = list(wds.WebDataset([str(path)], shardshuffle=False))
    assert [d["__key__"] for d in got] == [s.key for s in samples]
    for d, s in zip(got, samples):
        assert d["jpg"] == s.jpg and d["txt"] == s.txt and d["json"] == s.json


def test_read_shard_rejects_duplicate_and_non_regular_members(tmp_path):
    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("a.jpg", "a.jpg"):
            ti = tarfile.TarInfo(name)
            ti.size = 1
            tf.addfile(ti, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="twice"):
        list(read_shard(dup))
    d = tmp_path / "dir.tar"
    with tarfile.open(d, "w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("a")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    with pytest.raises(ValueError, match="not a regular file"):
        list(read_shard(d))


# plan_shards ---------------------------------------------------------------------------------------------


def test_sample_tar_bytes():
    assert sample_tar_bytes(0, 0, 0) == 3 * BLOCK
    assert sample_tar_bytes(1, 512, 513) == (BLOCK + 512) + (BLOCK + 512) + (BLOCK + 1024)


def test_tar_size():
    assert tar_size(0) == RECORD
    assert tar_size(RECORD - 2 * BLOCK) == RECORD
    assert tar_size(RECORD - 2 * BLOCK + 1) == 2 * RECORD


def _check_runs(runs, n):
    assert runs[0][0] == 0 and runs[-1][1] == n
    for (a, b), (c, _) in zip(runs, runs[1:]):
        assert b == c
    assert all(a < b for a, b in runs)


def test_plan_shards_max_samples():
    runs = plan_shards([1536] * 10, max_samples=3, max_bytes=10**9)
    assert runs == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_shards([1536] * 6, max_samples=3, max_bytes=10**9) == [(0, 3), (3, 6)]
    assert plan_shards([], 3, 10**9) == []


def test_plan_shards_max_bytes():
    sizes = [3000 + 512 * (i % 7) for i in range(60)]
    max_bytes = 3 * RECORD
    runs = plan_shards(sizes, max_samples=1000, max_bytes=max_bytes)
    _check_runs(runs, len(sizes))
    assert len(runs) > 1
    for a, b in runs:
        assert tar_size(sum(sizes[a:b])) <= max_bytes
    # runs are maximal: adding the next sample would break the byte limit
    for (a, b), _ in zip(runs, runs[1:]):
        assert tar_size(sum(sizes[a : b + 1])) > max_bytes


def test_plan_shards_both_limits():
    sizes = [2048] * 50
    runs = plan_shards(sizes, max_samples=4, max_bytes=2 * RECORD)
    _check_runs(runs, 50)
    for a, b in runs:
        assert b - a <= 4 and tar_size(sum(sizes[a:b])) <= 2 * RECORD


def test_plan_shards_oversized_sample_gets_own_shard():
    big = 5 * RECORD
    sizes = [1536, 1536, big, 1536]
    runs = plan_shards(sizes, max_samples=100, max_bytes=2 * RECORD)
    assert runs == [(0, 2), (2, 3), (3, 4)]


def test_plan_shards_real_shards_within_max_bytes(tmp_path):
    samples = _samples(12, jpg_size=3000)
    max_bytes = 2 * RECORD
    runs = plan_shards([s.tar_bytes for s in samples], max_samples=1000, max_bytes=max_bytes)
    assert len(runs) > 1
    for i, (a, b) in enumerate(runs):
        sf = write_shard(tmp_path / f"shard-{i:06d}.tar", samples[a:b])
        assert sf.bytes <= max_bytes


# plan_bucket_shards: the streaming planner and shard fingerprints ---------------------------------------

from bucket_assets.core.publish import DIFFERENT, UNCHANGED, UNKNOWN, file_identity, shard_state  # noqa: E402
from bucket_assets.core.shards import (  # noqa: E402
    PlannedShard,
    iter_sample_plan,
    plan_bucket_shards,
    read_sample_plan,
    sample_meta,
    shard_file_bytes,
)


def _plan_rows(n: int, bucket: str = "p512x512", seed: int = 0) -> list[dict]:
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({
            "bucket_id": bucket, "key": f"img_{i:05d}", "image_id": f"img_{i:05d}", "path": f"/store/{bucket}/pack-1.bin",
            "pack_offset": 1000 * i, "jpg_bytes": rnd.randint(200, 3000),
            "jpg_sha256": hashlib.sha256(f"{bucket}{i}".encode()).hexdigest(),
            "text": "caption " + "x" * rnd.randint(0, 900), "caption_variant": "alt_text",
            "caption_selector_index": 0, "caption_source_id": 1, "source": "laion", "src_w": 800, "src_h": 600,
            "target_w": 512, "target_h": 512, "url": f"http://example.com/{i}.jpg", "similarity": 0.5, "nsfw": None,
            "license": None,
        })
    return rows


@pytest.mark.parametrize("max_samples,max_bytes", [(1000, 10**9), (7, 10**9), (1000, 4 * RECORD), (5, 3 * RECORD), (1, 10**9)])
def test_plan_bucket_shards_splits_as_plan_shards(max_samples, max_bytes):
    rows = _plan_rows(60)
    # The samples and runs the whole-list planner makes.
    samples = [{"key": r["key"], "path": r["path"], "pack_offset": r["pack_offset"], "jpg_bytes": r["jpg_bytes"],
                "txt": caption_txt(r["text"]), "json": sample_meta(r, "p512x512")} for r in rows]
    sizes = [sample_tar_bytes(s["jpg_bytes"], len(s["txt"]), len(s["json"])) for s in samples]
    runs = plan_shards(sizes, max_samples, max_bytes)
    got = list(plan_bucket_shards(iter(rows), "p512x512", max_samples, max_bytes))
    assert [(g.index, len(g.samples)) for g in got] == [(i, b - a) for i, (a, b) in enumerate(runs)]
    for g, (a, b) in zip(got, runs):
        assert g.samples == samples[a:b]
        assert g.member_bytes == sum(sizes[a:b]) and g.file_bytes == shard_file_bytes(sum(sizes[a:b]))
        assert g.rel == f"buckets/p512x512/shard-{g.index:06d}.tar"
        assert (g.first_key, g.last_key) == (rows[a]["key"], rows[b - 1]["key"])
        assert g.fingerprint and len(g.fingerprint) == 64
    assert list(plan_bucket_shards(iter(()), "p512x512", max_samples, max_bytes)) == []


def test_shard_fingerprint_follows_exactly_the_content():
    rows = _plan_rows(12)
    base = [s.fingerprint for s in plan_bucket_shards(rows, "p512x512", 4, 10**9)]
    assert len(set(base)) == 3
    assert [s.fingerprint for s in plan_bucket_shards(_plan_rows(12), "p512x512", 4, 10**9)] == base
    # One change in sample 5 (shard 1) changes that shard's fingerprint only.
    for field, value in [("text", "another caption"), ("jpg_sha256", "0" * 64), ("jpg_bytes", 4000),
                         ("url", "http://other"), ("caption_source_id", 2), ("key", "img_00005a"),
                         ("path", "/elsewhere/pack.bin"), ("pack_offset", 7)]:
        changed = [dict(r) for r in rows]
        changed[5][field] = value
        fps = [s.fingerprint for s in plan_bucket_shards(changed, "p512x512", 4, 10**9)]
        if field in ("path", "pack_offset"):  # where the bytes are stored is not what they are
            assert fps == base, field
        else:
            assert fps[0] == base[0] and fps[2] == base[2] and fps[1] != base[1], field
    # The same samples in another bucket or place are another shard.
    other = [dict(r, bucket_id="p256x256") for r in rows]
    assert [s.fingerprint for s in plan_bucket_shards(other, "p256x256", 4, 10**9)] != base
    # Unknown JPEG hash: no fingerprint for that shard, so it is always built.
    missing = [dict(r) for r in rows]
    missing[9]["jpg_sha256"] = None
    fps = [s.fingerprint for s in plan_bucket_shards(missing, "p512x512", 4, 10**9)]
    assert fps[:2] == base[:2] and fps[2] is None


def test_plan_bucket_shards_needs_strictly_increasing_keys():
    rows = _plan_rows(5)
    rows[3]["key"] = rows[2]["key"]
    with pytest.raises(ValueError, match="increasing key order"):
        list(plan_bucket_shards(rows, "p512x512", 100, 10**9))


def test_iter_sample_plan_streams_the_file_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _plan_rows(50, "a") + _plan_rows(30, "b")
    path = tmp_path / "plan.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    assert list(iter_sample_plan(path, batch_rows=7)) == rows
    assert read_sample_plan(path, "b") == rows[50:]


def _recorded(shard: PlannedShard, ident, **kw) -> dict:
    row = {"path": shard.rel, "fingerprint": shard.fingerprint, "bytes": shard.file_bytes, "file_size": ident[0],
           "mtime_ns": ident[1], "inode": ident[2]}
    row.update(kw)
    return row


def test_shard_state(tmp_path):
    shard = next(plan_bucket_shards(_plan_rows(3), "p512x512", 100, 10**9))
    f = tmp_path / "shard.tar"
    f.write_bytes(b"\0" * shard.file_bytes)
    ident = file_identity(f)
    assert ident == (shard.file_bytes, f.stat().st_mtime_ns, f.stat().st_ino)
    state = lambda rec, pub=ident, fp=shard.fingerprint: shard_state(fp, shard.rel, shard.file_bytes, rec, pub)  # noqa: E731
    assert state(_recorded(shard, ident)) == UNCHANGED
    # Other content recorded for the same file: build, without comparing.
    assert state(_recorded(shard, ident, fingerprint="0" * 64)) == DIFFERENT
    # Anything else: build and compare.
    assert state(None) == UNKNOWN
    assert state(_recorded(shard, ident), pub=None) == UNKNOWN  # missing / not a regular file
    assert state(_recorded(shard, ident, fingerprint=None)) == UNKNOWN  # a row from before fingerprints
    assert state(_recorded(shard, ident), fp=None) == UNKNOWN  # a JPEG of unknown hash
    assert state(_recorded(shard, ident, mtime_ns=ident[1] + 1)) == UNKNOWN  # touched behind our back
    assert state(_recorded(shard, ident, inode=ident[2] + 1)) == UNKNOWN  # replaced (or a killed run's staged file)
    assert state(_recorded(shard, ident, file_size=ident[0] + 1)) == UNKNOWN
    assert state(_recorded(shard, ident, path="buckets/x/shard-000009.tar")) == UNKNOWN
    assert state(_recorded(shard, (None, None, None))) == UNKNOWN
    link = tmp_path / "link.tar"
    link.symlink_to(f)
    assert file_identity(link) is None and file_identity(tmp_path) is None and file_identity(tmp_path / "no") is None


def test_write_shard_known_different_does_not_read_the_published_file(tmp_path, monkeypatch):
    import bucket_assets.core.shards as shards_mod

    published = tmp_path / "pub.tar"
    write_shard(published, _samples(3))
    reads = []
    real = shards_mod.file_sha256
    monkeypatch.setattr(shards_mod, "file_sha256", lambda p: reads.append(p) or real(p))
    again = write_shard(tmp_path / "new.tar", lambda: iter(_samples(3)), same_as=published,
                        size=published.stat().st_size, known_different=True)
    assert reads == [] and again.rewritten
    assert (tmp_path / "new.tar").read_bytes() == published.read_bytes()
    # Without it the identical file is found by hash and nothing is written.
    same = write_shard(tmp_path / "new2.tar", lambda: iter(_samples(3)), same_as=published, size=published.stat().st_size)
    assert reads and not same.rewritten and not (tmp_path / "new2.tar").exists()


def _plan_db():
    import duckdb

    con = duckdb.connect()
    con.execute("""CREATE TABLE processed_images AS SELECT * FROM (VALUES
        ('a', 'b1', 'ka', 'pack-1.bin', 0, 'ok', 10, 'sha-a'), ('b', 'b1', 'kb', 'pack-1.bin', 10, 'ok', 12, 'sha-b'),
        ('c', 'b2', 'kc', 'pack-2.bin', 0, 'ok', 11, 'sha-c'))
        t(image_id, bucket_id, key, path, pack_offset, status, bytes, sha256)""")
    con.execute("""CREATE TABLE bucket_assignments AS SELECT image_id, bucket_id, 64 AS src_w, 48 AS src_h,
                   32 AS target_w, 24 AS target_h FROM processed_images""")
    con.execute("""CREATE TABLE selected_captions AS SELECT image_id, 'caption ' || image_id AS text,
                   'alt_text' AS caption_variant, 0 AS caption_selector_index, 1 AS caption_source_id,
                   'selected' AS status FROM processed_images""")
    con.execute("""CREATE TABLE filtered_images AS SELECT image_id, row_number() OVER (ORDER BY image_id) AS row_id,
                   'keep' AS decision FROM processed_images""")
    con.execute("""CREATE TABLE raw_index AS SELECT row_id, 'laion' AS source, 'http://x/' || image_id AS url,
                   0.3::DOUBLE AS similarity, 'UNLIKELY' AS nsfw, NULL::VARCHAR AS license,
                   '{"k": 1}' AS source_meta FROM filtered_images""")
    return con


def test_plan_digests_cover_every_plan_column_that_makes_shard_bytes():
    """A column added to the plan must be in the digest (or be a store location): otherwise a
    bucket whose digest stands would keep shards that no longer match their plan."""
    from bucket_assets.core.shards import DIGEST_COLUMNS, SAMPLE_PLAN_SQL, plan_digests

    con = _plan_db()
    cols = [r[0] for r in con.execute(f"DESCRIBE {SAMPLE_PLAN_SQL}", {"buckets": ["b1"]}).fetchall()]
    assert set(cols) - set(DIGEST_COLUMNS) == {"bucket_id", "path", "pack_offset"}
    before = plan_digests(con, ["b1", "b2"])
    assert set(before) == {"b1", "b2"} and before["b1"][0] == 2 and before["b2"][0] == 1
    assert plan_digests(con, ["b1", "b2"]) == before  # deterministic
    # The store location moves (compaction): same bytes, same digest.
    con.execute("UPDATE processed_images SET path = 'pack-9.bin', pack_offset = pack_offset + 100")
    assert plan_digests(con, ["b1", "b2"]) == before
    for table, change in [("selected_captions", "text = text || '!'"), ("raw_index", "similarity = 0.31"),
                          ("raw_index", "source_meta = '{\"k\": 2}'"), ("processed_images", "sha256 = 'other'"),
                          ("bucket_assignments", "src_w = 65")]:
        con.execute(f"CREATE TABLE saved AS SELECT * FROM {table}")
        con.execute(f"UPDATE {table} SET {change} WHERE image_id = 'b'" if table != "raw_index"
                    else f"UPDATE {table} SET {change} WHERE row_id = 2")
        now = plan_digests(con, ["b1", "b2"])
        assert now["b1"] != before["b1"] and now["b2"] == before["b2"], (table, change)
        con.execute(f"DELETE FROM {table}; INSERT INTO {table} SELECT * FROM saved; DROP TABLE saved")
    # Two samples swapping their captions keep the count but not the digest.
    con.execute("UPDATE selected_captions SET text = CASE image_id WHEN 'a' THEN 'caption b' WHEN 'b' THEN 'caption a' "
                "ELSE text END")
    assert plan_digests(con, ["b1", "b2"])["b1"] != before["b1"]
    # A JPEG whose sha256 is unknown: no digest, the bucket is always planned.
    con.execute("UPDATE processed_images SET sha256 = NULL WHERE image_id = 'c'")
    assert plan_digests(con, ["b1", "b2"])["b2"] is None


def test_one_pass_gives_each_shard_its_key_range_and_the_bucket_the_sum(tmp_path):
    """plan_digests_and_ranges: each recorded shard's digest covers the samples in its key range
    (keys before the first shard count in it, keys after the last in none), equal to what
    range_digests computes from a plan file; the bucket's digest combines every sample's."""
    from bucket_assets.core.shards import plan_digests_and_ranges, range_digests, write_sample_plan

    con = _plan_db()
    con.execute("""INSERT INTO processed_images VALUES ('d', 'b1', 'kd', 'pack-1.bin', 22, 'ok', 9, 'sha-d'),
                   ('e', 'b1', 'ke', 'pack-1.bin', 31, 'ok', 8, 'sha-e')""")
    for t, sql in [("bucket_assignments", "SELECT image_id, bucket_id, 64, 48, 32, 24 FROM processed_images"),
                   ("selected_captions", "SELECT image_id, 'caption ' || image_id, 'alt_text', 0, 1, 'selected' FROM processed_images"),
                   ("filtered_images", "SELECT image_id, row_number() OVER (ORDER BY image_id), 'keep' FROM processed_images"),
                   ("raw_index", "SELECT row_id, 'laion', 'http://x/' || image_id, 0.3, 'UNLIKELY', NULL, '{}' FROM filtered_images")]:
        con.execute(f"DELETE FROM {t}; INSERT INTO {t} {sql}")
    whole, none = plan_digests_and_ranges(con, ["b1", "b2"])
    assert none == {} and whole["b1"][0] == 4 and whole["b2"][0] == 1  # no shard_files yet
    # b1: shard 0 ends at kb (ka, kb), shard 1 at kd (kd); ke comes after the last shard.
    con.execute("""CREATE TABLE shard_files AS SELECT * FROM (VALUES ('b1', 0, 'kb'), ('b1', 1, 'kd'), ('b2', 0, 'kc'))
                   t(bucket_id, shard_index, last_key)""")
    totals, ranges = plan_digests_and_ranges(con, ["b1", "b2"])
    assert totals == whole
    assert {k: v[0] for k, v in ranges.items()} == {("b1", 0): 2, ("b1", 1): 1, ("b2", 0): 1}
    # With ke gone every sample lies in a shard: each bucket's digest combines its shards'.
    con.execute("DELETE FROM processed_images WHERE key = 'ke'")
    totals, ranges = plan_digests_and_ranges(con, ["b1", "b2"])
    for b in ("b1", "b2"):
        parts = [v for (bb, _), v in ranges.items() if bb == b]
        assert (sum(p[0] for p in parts), sum(p[1] for p in parts),
                functools.reduce(operator.xor, (p[2] for p in parts))) == totals[b]
    write_sample_plan(con, ["b1", "b2"], tmp_path / "plan.parquet", {"b1": "kb"})
    assert range_digests(con, {"b1": 1, "b2": 0}, tmp_path / "plan.parquet") == {
        k: v for k, v in ranges.items() if k != ("b1", 0)}
    # A sample's JPEG sha256 unknown: its shard's and its bucket's digests are None.
    con.execute("UPDATE processed_images SET sha256 = NULL WHERE key = 'kd'")
    totals, ranges = plan_digests_and_ranges(con, ["b1", "b2"])
    assert totals["b1"] is None and ranges[("b1", 1)] is None and ranges[("b1", 0)] is not None
