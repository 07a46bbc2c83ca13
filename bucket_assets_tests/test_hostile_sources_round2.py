"""Hostile inputs, round 2 (issue 11): one bad record, tar or file never sinks a scan; every
input ends as a record (exported or a named reason) or a counted per-file reason."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bucket_assets.core.raw_index import RAW_INDEX_SCHEMA, build_raw_index, scan_skips_table
from bucket_assets.core.sources import ScanStats, read_bytes, scan_source
from bucket_assets.core.sources.webdataset import MAX_JSON_SIDECAR
from bucket_assets.spec import parse_spec


def _jpeg(seed: int, w: int = 320, h: int = 240) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _members_only(members: list[tuple[str, bytes]]) -> bytes:
    """A tar's members without the end-of-archive blocks (so more can follow)."""
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    return data[: last.offset_data + -(-last.size // 512) * 512]


def _wds_spec(tmp_path: Path, pattern: str, **extra) -> object:
    d = {"name": "t", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
         "sources": [{"name": "laion", "kind": "webdataset", "paths": [pattern]}],
         "image": {"workers": 1}, "captions": {"landing_dir": str(tmp_path / "captions")}}
    d.update(extra)
    return parse_spec(d)


def _scan(spec) -> tuple[list, ScanStats]:
    stats = ScanStats()
    recs = [r for s in spec.sources for r in scan_source(s, stats, spec.captions.max_chars)]
    return recs, stats


def _with_timeout(fn, seconds: float = 20):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} hung for {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


# Whole tars that cannot be read are per-file reasons; the good tar beside them is scanned ----

def test_bad_tar_files_are_counted_and_the_scan_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = _tar_bytes([("good.jpg", _jpeg(1)), ("good.txt", b"fine")])
    (src / "a-good.tar").write_bytes(good)
    (src / "b-empty.tar").write_bytes(b"")
    (src / "c-cut-first-header.tar").write_bytes(good[:300])
    (src / "d-dir.tar").mkdir()
    os.mkfifo(src / "e-fifo.tar")
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes(_tar_bytes([("outside.jpg", _jpeg(2))]))
    (src / "f-link.tar").symlink_to(outside)
    (src / "g-garbage.tar").write_bytes(os.urandom(4096))
    recs, stats = _with_timeout(lambda: _scan(_wds_spec(tmp_path, str(src / "*.tar"))))
    assert [r.image_id for r in recs] == ["good"]
    assert stats.files == {"empty_file": 1, "unreadable_tar": 2, "not_a_file": 2, "symlink": 1}
    assert any("e-fifo.tar" in n for n in stats.notes) and any("f-link.tar" in n for n in stats.notes)
    t = scan_skips_table(stats)
    assert set(t.column("scope").to_pylist()) == {"file"}


def test_damaged_header_in_the_middle_resumes_at_the_next_member(tmp_path):
    members = [(f"k{i}.jpg", _jpeg(i, 64, 64)) for i in range(5)]
    data = bytearray(_tar_bytes(members))
    # Find the third member's header and overwrite it with junk (bad checksum, no magic).
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        third = tf.getmembers()[2].offset
    data[third : third + 512] = b"\x7f" * 512
    (tmp_path / "d.tar").write_bytes(bytes(data))
    recs, stats = _scan(_wds_spec(tmp_path, str(tmp_path / "d.tar")))
    assert [r.image_id for r in recs] == ["k0", "k1", "k3", "k4"]  # the tail is not lost
    assert stats.counts == {"damaged_tar_region": 1}
    for r in recs:
        assert read_bytes(r.location, r.member, r.offset, r.size) == dict(members)[f"{r.image_id}.jpg"]


def test_bytes_cut_out_of_a_header_shift_the_rest_and_it_is_still_found(tmp_path):
    members = [(f"k{i}.jpg", _jpeg(i, 64, 64)) for i in range(4)]
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        second = tf.getmembers()[1].offset
    cut = data[: second + 100] + data[second + 300 :]  # 200 bytes gone inside the second header
    (tmp_path / "s.tar").write_bytes(cut)
    recs, stats = _scan(_wds_spec(tmp_path, str(tmp_path / "s.tar")))
    ids = [r.image_id for r in recs]
    assert ids[0] == "k0" and "k2" in ids and "k3" in ids
    assert stats.counts.get("damaged_tar_region", 0) >= 1
    k3 = next(r for r in recs if r.image_id == "k3")
    assert read_bytes(k3.location, k3.member, k3.offset, k3.size) == members[3][1]


def test_tar_cut_inside_a_later_header_is_counted(tmp_path):
    members = [(f"k{i}.jpg", _jpeg(i, 64, 64)) for i in range(3)]
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        third = tf.getmembers()[2].offset
    (tmp_path / "c.tar").write_bytes(data[: third + 200])
    recs, stats = _scan(_wds_spec(tmp_path, str(tmp_path / "c.tar")))
    assert [r.image_id for r in recs] == ["k0", "k1"]
    assert stats.counts == {"truncated_tar": 1}
    assert any("cut at byte" in n for n in stats.notes)


def test_member_header_claiming_64_gib_does_not_allocate_it(tmp_path):
    good = _members_only([("a.jpg", _jpeg(1, 64, 64))])
    # A GNU long-name header whose size field claims 64 GiB: tarfile would read() that much.
    ti = tarfile.TarInfo("././@LongLink")
    ti.type = tarfile.GNUTYPE_LONGNAME
    ti.size = 64 << 30
    header = ti.tobuf(format=tarfile.GNU_FORMAT)[:512]
    rest = _tar_bytes([("b.jpg", _jpeg(2, 64, 64))])
    (tmp_path / "huge.tar").write_bytes(good + header + b"x" * 512 + rest)
    recs, stats = _scan(_wds_spec(tmp_path, str(tmp_path / "huge.tar")))
    assert [r.image_id for r in recs][:1] == ["a"] and "b" in [r.image_id for r in recs]
    assert sum(stats.counts.values()) >= 1
    # A regular member claiming 64 GiB: a record whose read is refused, not attempted.
    ti = tarfile.TarInfo("big.jpg")
    ti.size = 64 << 30
    (tmp_path / "big.tar").write_bytes(ti.tobuf(format=tarfile.GNU_FORMAT) + _jpeg(3, 64, 64))
    recs, stats = _scan(_wds_spec(tmp_path, str(tmp_path / "big.tar")))
    assert [r.image_id for r in recs] == ["big"] and stats.counts == {"truncated_tar": 1}
    with pytest.raises(OSError, match="truncated"):
        read_bytes(recs[0].location, recs[0].member, recs[0].offset, recs[0].size)


def test_sidecars_over_the_cap(tmp_path):
    big_txt = ("word " * (3 << 20)).encode()  # 15 MB caption
    big_json = json.dumps({"similarity": 0.01, "NSFW": "NSFW", "pad": "x" * (MAX_JSON_SIDECAR + 10)}).encode()
    data = _tar_bytes([("a.jpg", _jpeg(1)), ("a.txt", big_txt), ("b.jpg", _jpeg(2)), ("b.json", big_json),
                       ("c.jpg", _jpeg(3)), ("c.json", json.dumps({"similarity": 0.01, "NSFW": "NSFW",
                                                                   "pad": "y" * (5 << 20)}).encode())])
    (tmp_path / "s.tar").write_bytes(data)
    spec = _wds_spec(tmp_path, str(tmp_path / "s.tar"), captions={"landing_dir": str(tmp_path / "c"), "max_chars": 1000})
    recs = {r.image_id: r for r in _scan(spec)[0]}
    assert len(recs["a"].caption) <= 1000 and recs["a"].caption.startswith("word word")
    assert "caption_truncated" in recs["a"].notes
    assert recs["b"].issue == "json_too_large"  # its filters cannot be evaluated: not kept
    assert recs["c"].issue is None and recs["c"].similarity == 0.01 and recs["c"].nsfw == "NSFW"


def test_extra_image_members_of_one_key_are_counted(tmp_path):
    (tmp_path / "x.tar").write_bytes(_tar_bytes([("a.jpg", _jpeg(1)), ("a.png", b"png"), ("a.webp", b"w")]))
    recs, stats = _scan(_wds_spec(tmp_path, str(tmp_path / "x.tar")))
    assert len(recs) == 1 and recs[0].member == "a.jpg"
    assert stats.counts == {"extra_image_member": 2}


# Values inside records: never an exception, always something the raw index can hold --------

HOSTILE_JSON = {
    "surrogate": b'{"url": "http://x/\\ud800", "caption": "\\udfff cap", "NSFW": "UNLIKELY"}',
    "deep": b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "deepish": b'{"a": ' + b"[" * 200 + b"]" * 200 + b', "similarity": 0.9}',
    "bigint": b'{"similarity": ' + b"9" * 5000 + b"}",
    "hugesim": b'{"similarity": ' + b"9" * 400 + b"}",
    "infsize": b'{"width": Infinity, "height": 1e400, "similarity": -Infinity}',
    "oversize": b'{"original_width": 4294967296, "original_height": -5, "similarity": NaN}',
    "strsize": b'{"original_width": "640", "original_height": "x480", "NSFW": NaN, "url": NaN}',
    "huge_key_int": b'{"x": 123456789012345678901234567890}',
}


def test_hostile_json_sidecars_become_records(tmp_path):
    members = []
    for i, (key, js) in enumerate(HOSTILE_JSON.items()):
        members += [(f"{key}.jpg", _jpeg(i, 64, 64)), (f"{key}.json", js)]
    (tmp_path / "j.tar").write_bytes(_tar_bytes(members))
    spec = _wds_spec(tmp_path, str(tmp_path / "j.tar"))
    table, stats = build_raw_index(spec, workers=1)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(HOSTILE_JSON)
    assert table.schema.equals(RAW_INDEX_SCHEMA)
    for r in rows.values():
        json.loads(r["source_meta"])  # valid JSON (no NaN) and UTF-8
        assert r["issue"] is None
    assert rows["surrogate"]["url"] == "http://x/\ufffd"
    assert "json_invalid" in rows["deep"]["notes"] and "json_invalid" in rows["bigint"]["notes"]
    assert rows["deepish"]["similarity"] == 0.9 and "json_too_deep" in rows["deepish"]["notes"]
    assert rows["hugesim"]["similarity"] is None and "invalid_similarity" in rows["hugesim"]["notes"]
    assert rows["infsize"]["orig_w"] is None and "invalid_size" in rows["infsize"]["notes"]
    assert rows["oversize"]["orig_w"] is None and rows["oversize"]["orig_h"] is None
    assert rows["strsize"]["orig_w"] == 640 and rows["strsize"]["orig_h"] is None and rows["strsize"]["nsfw"] is None and rows["strsize"]["url"] is None
    assert json.loads(rows["huge_key_int"]["source_meta"])["x"] == "123456789012345678901234567890"  # kept, as text


def test_member_and_file_names_that_are_not_utf8(tmp_path):
    # Tar members: names decoded with surrogateescape become \\x escapes, still readable.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        for name, data in (("caf\xe9.jpg", _jpeg(1, 64, 64)), ("caf\xe9.txt", "d\xe9j\xe0".encode("latin-1"))):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (tmp_path / "n.tar").write_bytes(buf.getvalue())
    spec = _wds_spec(tmp_path, str(tmp_path / "n.tar"))
    table, _ = build_raw_index(spec, workers=1)
    (row,) = table.to_pylist()
    assert row["image_id"] == "caf\\xe9" and row["issue"] is None and row["sha256"]
    assert "name_not_utf8" in row["notes"] and "caption_not_utf8" in row["notes"]
    # Folder files: a name that is not UTF-8 is a named reason; the good file beside it exports.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(_jpeg(2, 64, 64))
    with open(os.path.join(os.fsencode(folder), b"bad\xff.jpg"), "wb") as f:
        f.write(_jpeg(3, 64, 64))
    os.mkfifo(folder / "pipe.jpg")
    (folder / "link.jpg").symlink_to(folder / "good.jpg")
    (folder / "good.txt").write_bytes(b"x" * (30 << 20))
    spec = parse_spec({"name": "t", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                       "sources": [{"name": "f", "kind": "folder", "path": str(folder)}],
                       "captions": {"landing_dir": str(tmp_path / "c"), "max_chars": 100}})
    table, stats = _with_timeout(lambda: build_raw_index(spec, workers=1))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert rows["bad\\xff"]["issue"] == "name_not_utf8"
    assert rows["pipe"]["issue"] == "unsafe_file" and rows["link"]["issue"] == "unsafe_file"
    assert rows["good"]["issue"] is None and len(rows["good"]["caption"]) == 100
    assert "caption_truncated" in rows["good"]["notes"]
    assert stats.counts == {} and stats.files == {}


def test_parquet_values_out_of_range(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"r{i}.jpg").write_bytes(_jpeg(i, 64, 64))
    table = pa.table({
        "id": ["r0", "r1", "r2", None, "r4"],
        "caption": [b"ok", b"\xff\xfe bad", None, b"c", b"d"],
        "width": pa.array([2**40, 640, None, 1, 5], pa.int64()),
        "height": pa.array([float("inf"), 480.0, float("nan"), 1.0, -3.0], pa.float64()),
        "url": pa.array([b"http://\xff", b"u", None, None, b"v"], pa.binary()),
    })
    pq.write_table(table, tmp_path / "m.parquet")
    spec = parse_spec({"name": "t", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                       "sources": [{"name": "p", "kind": "parquet", "path": str(tmp_path / "m.parquet"),
                                    "image_dir": str(images),
                                    "columns": {"id": "id", "caption": "caption", "width": "width",
                                                "height": "height", "url": "url"}}],
                       "captions": {"landing_dir": str(tmp_path / "c")}})
    out, stats = build_raw_index(spec, workers=1)
    rows = {r["image_id"]: r for r in out.to_pylist()}
    assert rows["r0"]["orig_w"] is None and "invalid_size" in rows["r0"]["notes"]
    assert rows["r0"]["url"] == "http://\ufffd"
    assert rows["r1"]["caption"] == "\ufffd\ufffd bad" and rows["r1"]["orig_w"] == 640
    assert rows["m-3"]["issue"] == "missing_id"  # a row without an id is a record with a reason
    assert stats.counts == {}


# The whole build: every hostile input beside a good control, exit 0, everything accounted ----

def test_a_build_over_hostile_sources_exports_the_good_ones(tmp_path):
    from bucket_assets.core.manifest import verify_export
    from bucket_assets_tests.conftest import materialize_all

    tars = tmp_path / "raw" / "laion"
    tars.mkdir(parents=True)
    members = [("good.jpg", _jpeg(1)), ("good.txt", b"a good caption")]
    for i, (key, js) in enumerate(HOSTILE_JSON.items()):
        members += [(f"{key}.jpg", _jpeg(10 + i)), (f"{key}.json", js)]
    members += [("bigtxt.jpg", _jpeg(40)), ("bigtxt.txt", b"long " * (2 << 20))]
    (tars / "00-good.tar").write_bytes(_tar_bytes(members))
    (tars / "01-empty.tar").write_bytes(b"")
    (tars / "02-cut.tar").write_bytes(_tar_bytes([("x.jpg", _jpeg(50))])[:200])
    (tars / "03-dir.tar").mkdir()
    os.mkfifo(tars / "04-fifo.tar")
    tail = _tar_bytes([("t0.jpg", _jpeg(60)), ("t1.jpg", _jpeg(61)), ("t2.jpg", _jpeg(62))])
    with tarfile.open(fileobj=io.BytesIO(tail)) as tf:
        second = tf.getmembers()[1].offset
    (tars / "05-damaged.tar").write_bytes(tail[:second] + b"\x01" * 512 + tail[second + 512 :])
    folder = tmp_path / "raw" / "folder"
    folder.mkdir()
    (folder / "fine.jpg").write_bytes(_jpeg(70))
    with open(os.path.join(os.fsencode(folder), b"n\xe4me.jpg"), "wb") as f:
        f.write(_jpeg(71))
    os.mkfifo(folder / "pipe.jpg")
    (folder / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    spec = {
        "name": "hostile", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
        "sources": [{"name": "laion", "kind": "webdataset", "paths": [str(tars / "*.tar")]},
                    {"name": "folder", "kind": "folder", "path": str(folder)}],
        "filters": {"min_similarity": None},
        "buckets": {"base_resolutions": [128], "divisible": 8},
        "image": {"workers": 1}, "captions": {"landing_dir": str(tmp_path / "captions")},
    }
    import yaml

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = _with_timeout(lambda: materialize_all(spec_path), 300)
    assert result.success
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    s = manifest["summary"]
    assert s["source_files_skipped"] == {"empty_file": 1, "not_a_file": 2, "unreadable_tar": 1}
    assert s["tar_members_skipped"] == {"damaged_tar_region": 1}
    skips = sum(v for k, v in s.items() if k.startswith("skipped_") or k in ("decode_errors", "encode_errors"))
    assert s["images_seen"] == s["images_exported"] + skips
    # good + 9 hostile-json + bigtxt + t0, t2 (after the damaged header) + fine + n\xe4me + pipe + eps
    assert s["images_seen"] == 17
    assert s["skipped_name_not_utf8"] == 1 and s["skipped_unsafe_file"] == 1 and s["decode_errors"] == 1
    assert s["images_exported"] == 14
    verify_export(tmp_path / "out")
