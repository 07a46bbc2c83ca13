"""Deterministic WebDataset shards: keys, sample JSON, shard planning, writing and reading."""

from __future__ import annotations

import hashlib
import io
import json
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
