"""img2dataset output as a webdataset source (issue 14): the per-shard `<shard>.parquet` beside
each tar is read, so failed downloads become counted records, success rows lend their columns
to the tar's samples, and the tar's scan unit follows the parquet.

The first test runs the real img2dataset (PyPI, see img2dataset_tool) against a loopback server;
the others write img2dataset's layout with tarfile and pyarrow and need nothing installed."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from bucket_assets.core.db import connect
from bucket_assets.core.manifest import verify_export
from bucket_assets.core.scan_cache import ScanCache
from bucket_assets.core.shards import read_shard
from bucket_assets.core.sources import ScanStats
from bucket_assets.core.sources import webdataset
from bucket_assets.distributed import LocalCompute
from bucket_assets.spec import SpecError, load_spec, parse_spec
from bucket_assets_tests.conftest import materialize_all
from bucket_assets_tests.img2dataset_tool import img2dataset_exe, photo_bytes, photo_server, run_img2dataset

EXTRA = ["similarity", "NSFW", "LICENSE", "aesthetic"]
PER_SHARD = 8
# The input, 3 shards of 8: good photos with failures among them, and a last shard where every
# URL fails (img2dataset then writes an empty tar).
LAYOUT = (["img"] * 6 + ["missing", "error"]) + (["img"] * 6 + ["garbage", "missing"]) + \
    ["missing", "error", "garbage", "missing", "missing", "error", "missing", "garbage"]


@pytest.fixture(scope="module")
def i2d_output(tmp_path_factory):
    """(input rows, img2dataset's output dir), from one real img2dataset run per module."""
    exe, why = img2dataset_exe()
    if exe is None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("i2d")
    photos = photo_bytes(LAYOUT.count("img"), seed=14)
    rows, n = [], {}
    with photo_server(photos) as base:
        for kind in LAYOUT:
            i = n[kind] = n.get(kind, -1) + 1
            good = kind == "img"
            rows.append({"url": f"{base}/{kind}{i}.jpg", "caption": f"{kind} {i}",
                         "similarity": 0.31 + i / 100 if good else 0.5, "NSFW": "UNLIKELY",
                         "LICENSE": f"cc-by-{i}" if good else "?",
                         "aesthetic": 4.0 + i * 0.25 if good else 9.0})
        pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
        run_img2dataset(exe, root / "urls.parquet", root / "out", EXTRA, per_shard=PER_SHARD)
    return rows, root / "out"


def test_img2dataset_output_exports_and_accounts_for_every_url(i2d_output, tmp_path):
    rows, out = i2d_output
    tars = sorted(out.glob("*.tar"))
    assert len(tars) == 3 and all(t.with_suffix(".parquet").is_file() for t in tars)
    with tarfile.open(tars[-1]) as tf:
        assert tf.getmembers() == []  # the shard whose every URL failed: an empty, valid tar

    spec = {
        "name": "i2d", "output_dir": str(tmp_path / "export"), "work_dir": str(tmp_path / "work"),
        "sources": [{"name": "laion", "kind": "webdataset", "paths": [str(out / "*.tar")]}],
        "buckets": {"base_resolutions": [256]},
        "filters": {"columns": [{"column": "aesthetic", "min": 5.0}]},
        "image": {"workers": 1},
        "captions": {"landing_dir": str(tmp_path / "captions"), "selectors": ["alt_text"]},
    }
    (tmp_path / "captions").mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert materialize_all(path).success
    spec = load_spec(path)
    manifest = json.loads((Path(spec.output_dir) / "manifest.json").read_text())
    s = manifest["summary"]

    failed = sum(k in ("missing", "error") for k in LAYOUT)
    undecodable = LAYOUT.count("garbage")
    low = sum(1 for r in rows if r["url"].rsplit("/", 1)[1].startswith("img") and r["aesthetic"] < 5.0)
    assert low > 0
    # Every URL row of the input is a record: exported or exactly one reason.
    assert s["images_seen"] == len(rows) == 24
    assert s["skipped_download_failed"] == failed
    assert s["decode_errors"] == undecodable
    assert s["skipped_column_filter"] == low  # aesthetic, an additional column, filters
    assert s["images_exported"] >= 1
    skips = sum(v for k, v in s.items() if k.startswith("skipped_") or k in ("decode_errors", "encode_errors"))
    assert s["images_seen"] == s["images_exported"] + skips
    assert s["source_files_skipped"] == {} and s["tar_members_skipped"] == {}
    verify_export(spec.output_dir)

    con = duckdb.connect(str(spec.db_path), read_only=True)
    try:
        details = con.execute("""SELECT f.decision, f.detail, r.url FROM filtered_images f
                                 JOIN raw_index r USING (row_id) WHERE f.decision IN
                                 ('download_failed', 'decode_error', 'column_filter')""").fetchall()
        meta = {r[0]: json.loads(r[1]) for r in con.execute(
            "SELECT url, source_meta FROM raw_index WHERE issue IS NULL").fetchall()}
    finally:
        con.close()
    by_url = {r["url"]: r for r in rows}
    for decision, detail, url in details:
        kind = url.rsplit("/", 1)[1]
        if decision == "download_failed":  # img2dataset's error_message, as it wrote it
            assert detail == ("HTTP Error 404: Not Found" if kind.startswith("missing")
                              else "HTTP Error 500: Internal Server Error"), (url, detail)
        elif decision == "decode_error":
            assert kind.startswith("garbage") and detail  # img2dataset's message (decode failed)
        else:
            assert detail == f"aesthetic {by_url[url]['aesthetic']} < min 5.0"
    assert len(details) == failed + undecodable + low
    assert len(meta) == LAYOUT.count("img")
    for url, m in meta.items():  # the additional columns reach the source metadata
        assert {k: m[k] for k in EXTRA} == {k: by_url[url][k] for k in EXTRA}
        assert m["status"] == "success" and m["key"]

    samples = [json.loads(parts["json"]) for shard in Path(spec.output_dir).rglob("shard-*.tar")
               for _key, parts in read_shard(shard)]
    assert len(samples) == s["samples_exported"] >= 1
    for sj in samples:  # the sample json carries the LAION columns img2dataset saved
        row = by_url[sj["url"]]
        assert (sj["similarity"], sj["nsfw"], sj["license"]) == (row["similarity"], "UNLIKELY", row["LICENSE"])
        assert row["aesthetic"] >= 5.0
        assert {k: sj["source_meta"][k] for k in EXTRA} == {k: row[k] for k in EXTRA}


def test_hub_parquet_img2dataset_output_and_an_imagefolder_in_one_export(i2d_output, tmp_path):
    """Issue 14's done-when: the three kinds of input users have, in one spec; the export
    verifies and every input row is an exported sample or a named reason."""
    datasets = pytest.importorskip("datasets")
    rows, out = i2d_output
    photos = photo_bytes(9, seed=41)
    # Hugging Face Hub style, written by `datasets` itself: two files, a row without an image.
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    feats = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                               "text": datasets.Value("string"), "aesthetic": datasets.Value("float64")})
    hub_rows = [{"key": f"hub{i}", "image": {"bytes": b, "path": f"hub{i}.jpg"}, "text": f"hub photo {i}",
                 "aesthetic": 5.0 + i} for i, b in enumerate(photos[:5])]
    hub_rows.append({"key": "hub-null", "image": None, "text": "no image", "aesthetic": 9.0})
    ds = datasets.Dataset.from_list(hub_rows, features=feats)
    for k in range(2):
        ds.shard(num_shards=2, index=k, contiguous=True).to_parquet(str(hub / f"train-{k:05d}-of-00002.parquet"))
    # An imagefolder with metadata.jsonl: one row names a file that is not there, one image
    # has no row (its sidecar captions it), one row is below the aesthetic bound.
    local = tmp_path / "local"
    (local / "train").mkdir(parents=True)
    for i, b in enumerate(photos[5:]):
        (local / "train" / f"{i:04d}.jpg").write_bytes(b)
    (local / "train" / "0003.txt").write_text("a sidecar caption")
    meta_rows = [{"file_name": "train/0000.jpg", "text": "local photo 0", "aesthetic": 6.5},
                 {"file_name": "train/0001.jpg", "text": "local photo 1", "aesthetic": 7.5},
                 {"file_name": "train/0002.jpg", "text": "local photo 2", "aesthetic": 2.0},
                 {"file_name": "train/0009.jpg", "text": "not there", "aesthetic": 8.0}]
    (local / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta_rows))

    spec = {
        "name": "mixed", "output_dir": str(tmp_path / "export"), "work_dir": str(tmp_path / "work"),
        "sources": [
            {"name": "hf", "kind": "parquet", "path": str(hub / "*.parquet"),
             "columns": {"id": "key", "image": "image", "caption": "text"}, "caption_variant": "alt_text"},
            {"name": "laion", "kind": "webdataset", "paths": [str(out / "*.tar")]},
            {"name": "local", "kind": "folder", "path": str(local), "columns": {"caption": "text"}},
        ],
        "buckets": {"base_resolutions": [256]},
        "filters": {"columns": [{"column": "aesthetic", "min": 5.0}]},
        "image": {"workers": 2},
        "captions": {"landing_dir": str(tmp_path / "captions"), "selectors": ["alt_text", "sidecar"]},
    }
    (tmp_path / "captions").mkdir()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert materialize_all(path).success
    spec = load_spec(path)
    verify_export(spec.output_dir)
    s = json.loads((Path(spec.output_dir) / "manifest.json").read_text())["summary"]
    assert s["images_seen"] == len(hub_rows) + len(rows) + len(meta_rows) + 1  # + the image without a row
    skips = {k: v for k, v in s.items() if (k.startswith("skipped_") or k in ("decode_errors", "encode_errors")) and v}
    assert s["images_seen"] == s["images_exported"] + sum(skips.values())
    assert skips["skipped_missing_image"] == 1 and skips["skipped_missing_file"] == 1
    assert skips["skipped_download_failed"] == sum(k in ("missing", "error") for k in LAYOUT)
    samples = {sj["image_id"]: sj for shard in Path(spec.output_dir).rglob("shard-*.tar")
               for sj in (json.loads(parts["json"]) for _key, parts in read_shard(shard))}
    assert {f"hub{i}" for i in range(5)} <= set(samples)
    assert {"train/0000", "train/0001", "train/0003"} <= set(samples) and "train/0002" not in samples
    for sj in samples.values():  # scores travel with every sample that has them
        if sj["image_id"] != "train/0003":
            assert sj["source_meta"]["aesthetic"] >= 5.0, sj


# Without img2dataset: its layout written by hand ------------------------------------------------

def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _tar(path: Path, samples: dict[str, dict | None]) -> None:
    """key -> its .json (None: no .json); each sample has a .jpg and a .txt."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, (key, meta) in enumerate(samples.items()):
            parts = [(f"{key}.jpg", _jpeg(i)), (f"{key}.txt", f"caption of {key}".encode())]
            if meta is not None:
                parts.append((f"{key}.json", json.dumps(meta).encode()))
            for name, data in parts:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _row(key, status="success", error=None, **extra) -> dict:
    return {"url": f"http://x/{key}", "caption": f"parquet caption {key}", "similarity": 0.9, "NSFW": "UNLIKELY",
            "LICENSE": "cc0", "aesthetic": 6.0, "key": key, "status": status, "error_message": error,
            "width": 64 if status == "success" else None, "height": 48 if status == "success" else None,
            "original_width": 640 if status == "success" else None,
            "original_height": 480 if status == "success" else None, **extra}


def _source(raw: Path, mode="auto") -> webdataset.WebDatasetSource:
    d = {"name": "laion", "kind": "webdataset", "paths": [str(raw / "*.tar")]}
    if mode != "auto":
        d["read_shard_parquet"] = mode
    return parse_spec({"name": "t", "output_dir": str(raw.parent / "out"), "work_dir": str(raw.parent / "work"),
                       "sources": [d]}).sources[0]


def _scan(source, tar: Path):
    stats = ScanStats()
    return list(webdataset.scan_file(source, str(tar), stats, 1000)), stats


def test_rows_pair_with_samples_by_key_and_failures_become_records(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    tar = raw / "00000.tar"
    # Samples in completion order (not key order), as img2dataset writes them; "c" has no
    # .json; "z" is in the tar but not the parquet.
    _tar(tar, {"c": None, "a": {"similarity": 0.5, "key": "a", "status": "success"}, "z": {"similarity": 0.4}})
    pq.write_table(pa.Table.from_pylist([
        _row("a"), _row("d", "failed_to_download", "HTTP Error 404: Not Found"), _row("c"),
        _row("e", "failed_to_resize", "Image decoding error"), _row("f"), _row(None, "success"),
        _row("d", "failed_to_download", "timed out"),
    ]), raw / "00000.parquet")
    recs, stats = _scan(_source(raw), tar)
    assert stats.files == {} and stats.counts == {}
    by = [(r.image_id, r.issue, r.issue_detail) for r in recs]
    assert by == [
        ("c", None, None), ("a", None, None), ("z", None, None),
        ("d", "download_failed", "HTTP Error 404: Not Found"),
        ("e", "decode_error", "Image decoding error"),
        ("f", "missing_image", f"{tar}: key f has no image in the tar (status success in 00000.parquet)"),
        ("00000-5", "missing_id", f"{raw / '00000.parquet'}: row 5 has a null key"),
        ("d", "duplicate_id", f"{raw / '00000.parquet'}: row 6 repeats key d"),
    ]
    c, a, z = recs[:3]
    # The tar's .json wins where both have a key; the row fills in what it lacks.
    assert a.similarity == 0.5 and a.license == "cc0" and a.url == "http://x/a" and a.meta["aesthetic"] == 6.0
    assert (a.orig_w, a.orig_h) == (640, 480)
    # No .json: the row is the metadata; the .txt stays the caption.
    assert c.meta == _row("c") and c.similarity == 0.9 and c.nsfw == "UNLIKELY"
    assert (c.caption, c.caption_field) == ("caption of c", "txt")
    assert c.member == "c.jpg" and c.location == str(tar)
    # Not in the parquet: read from the tar alone.
    assert z.meta == {"similarity": 0.4} and z.license is None and z.member == "z.jpg"
    d = recs[3]
    assert d.member is None and d.meta["url"] == "http://x/d" and d.similarity == 0.9
    assert (d.caption, d.caption_field) == ("parquet caption d", "parquet.caption")

    # A row whose status says there is no image while the tar has it: the sample, flagged.
    pq.write_table(pa.Table.from_pylist([_row("a", "failed_to_resize", "odd")]), raw / "00000.parquet")
    recs, _ = _scan(_source(raw), tar)
    assert [(r.image_id, r.issue) for r in recs] == [("c", None), ("a", None), ("z", None)]
    assert recs[1].notes == ["shard_status_mismatch"]


def test_read_shard_parquet_modes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    tar, other = raw / "00000.tar", raw / "00001.tar"
    _tar(tar, {"a": None})
    _tar(other, {"b": None})
    pq.write_table(pa.Table.from_pylist([_row("a"), _row("x", "failed_to_download", "boom")]), raw / "00000.parquet")

    recs, stats = _scan(_source(raw, False), tar)  # false: never read
    assert [r.image_id for r in recs] == ["a"] and recs[0].meta is None and stats.files == {}
    recs, stats = _scan(_source(raw, True), tar)
    assert [r.image_id for r in recs] == ["a", "x"] and stats.files == {}

    # A tar without its parquet: nothing under auto; under true a named per-file reason, and
    # the tar is still read.
    recs, stats = _scan(_source(raw), other)
    assert [r.image_id for r in recs] == ["b"] and stats.files == {}
    recs, stats = _scan(_source(raw, True), other)
    assert [r.image_id for r in recs] == ["b"] and stats.files == {"missing_shard_parquet": 1}
    assert stats.notes == [f"source laion: {other} has no shard parquet {raw / '00001.parquet'} "
                           "(read_shard_parquet: true)"]


def test_a_bad_shard_parquet_is_a_file_reason_and_the_tar_is_still_read(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    tar = raw / "00000.tar"
    _tar(tar, {"a": {"similarity": 0.4}})
    side = raw / "00000.parquet"
    good = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([_row("a"), _row("x", "failed_to_download", "boom")]), good)
    cases = {
        "garbage": b"PAR1 this is not a parquet file PAR1",
        "cut": good.getvalue()[: len(good.getvalue()) // 2],
        "no key/status": None,
    }
    for name, data in cases.items():
        if data is None:
            pq.write_table(pa.table({"url": ["http://x/a"]}), side)
        else:
            side.write_bytes(data)
        recs, stats = _scan(_source(raw), tar)
        assert [(r.image_id, r.issue, r.similarity) for r in recs] == [("a", None, 0.4)], name
        assert stats.files == {"unreadable_shard_parquet": 1}, name
        (note,) = stats.notes
        assert note.startswith(f"source laion: cannot read shard parquet {side}: ") and "\n" not in note, name
    side.unlink()
    os.symlink(raw / "elsewhere.parquet", side)  # links are not followed, for a parquet either
    recs, stats = _scan(_source(raw), tar)
    assert [r.image_id for r in recs] == ["a"] and stats.files == {"symlink": 1}


def test_a_shard_whose_every_download_failed(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    tar = raw / "00002.tar"
    tarfile.open(tar, "w").close()  # img2dataset's tar of a shard without one image: empty, valid
    rows = [_row("k0", "failed_to_download", "HTTP Error 404: Not Found"),
            _row("k1", "failed_to_download", "<urlopen error [Errno 111] Connection refused>"),
            _row("k2", "failed_to_resize", "Image decoding error")]
    pq.write_table(pa.Table.from_pylist(rows), raw / "00002.parquet")
    recs, stats = _scan(_source(raw), tar)
    assert stats.files == {} and stats.counts == {}
    assert [(r.image_id, r.issue, r.issue_detail) for r in recs] == [
        ("k0", "download_failed", "HTTP Error 404: Not Found"),
        ("k1", "download_failed", "<urlopen error [Errno 111] Connection refused>"),
        ("k2", "decode_error", "Image decoding error")]
    # A tar that cannot be read at all (0 bytes, cut by an interrupted run) is its file reason;
    # its parquet's rows are still records (a success is then missing_image).
    tar.write_bytes(b"")
    pq.write_table(pa.Table.from_pylist(rows[:1] + [_row("k3")]), raw / "00002.parquet")
    recs, stats = _scan(_source(raw), tar)
    assert stats.files == {"empty_file": 1}
    assert [(r.image_id, r.issue) for r in recs] == [("k0", "download_failed"), ("k3", "missing_image")]


def _build(spec):
    out = ScanCache(spec, LocalCompute(1)).build(lambda: connect(spec.db_path))
    with connect(spec.db_path) as con:
        rows = con.execute("SELECT image_id, issue, similarity FROM raw_index ORDER BY row_id").fetchall()
    return (out.units_scanned, out.units_reused), rows


def test_the_tar_unit_follows_its_shard_parquet(tmp_path, monkeypatch):
    from bucket_assets_tests.test_scan_cache import _Opens

    raw = tmp_path / "raw"
    raw.mkdir()
    for n in range(2):
        _tar(raw / f"0000{n}.tar", {f"s{n}": None})
    side = raw / "00000.parquet"
    pq.write_table(pa.Table.from_pylist([_row("s0"), _row("x0", "failed_to_download", "boom")]), side)

    def spec(mode="auto", work="work"):
        d = {"name": "laion", "kind": "webdataset", "paths": [str(raw / "*.tar")]}
        if mode != "auto":
            d["read_shard_parquet"] = mode
        return parse_spec({"name": "t", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / work),
                           "sources": [d], "image": {"workers": 1}})

    opens = _Opens(raw, monkeypatch)
    with opens.watch() as first:
        counts, rows = _build(spec())
    assert counts == (2, 0) and rows == [("s0", None, 0.9), ("x0", "download_failed", 0.9), ("s1", None, None)]
    assert str(side) in first  # the hook sees the parquet's open
    with opens.watch() as second:
        counts, again = _build(spec())
    assert second == [] and counts == (0, 2) and again == rows  # a no-op rebuild opens nothing

    # The parquet changed, removed, added beside the other tar: only that tar is scanned again.
    pq.write_table(pa.Table.from_pylist([_row("s0", similarity=0.7)]), side)
    counts, rows = _build(spec())
    assert counts == (1, 1) and rows == [("s0", None, 0.7), ("s1", None, None)]
    side.unlink()
    counts, rows = _build(spec())
    assert counts == (1, 1) and rows == [("s0", None, None), ("s1", None, None)]
    pq.write_table(pa.Table.from_pylist([_row("s1"), _row("x1", "failed_to_resize", "bad")]), raw / "00001.parquet")
    counts, rows = _build(spec())
    assert counts == (1, 1) and rows == [("s0", None, None), ("s1", None, 0.9), ("x1", "decode_error", 0.9)]
    assert rows == _build(spec(work="fresh"))[1]  # the same as a scan from scratch

    # read_shard_parquet: false leaves the parquet out of the fingerprint too.
    counts, rows = _build(spec(False))
    assert counts == (2, 0) and rows == [("s0", None, None), ("s1", None, None)]
    (raw / "00001.parquet").unlink()
    assert _build(spec(False)) == ((0, 2), rows)


def test_read_shard_parquet_spec_values(tmp_path):
    base = {"name": "t", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w")}
    for value in ("auto", True, False):
        src = {"name": "laion", "kind": "webdataset", "paths": ["x/*.tar"], "read_shard_parquet": value}
        assert parse_spec({**base, "sources": [src]}).sources[0].read_shard_parquet == value
    assert parse_spec({**base, "sources": [{"name": "l", "kind": "webdataset", "paths": ["x/*.tar"]}]}) \
        .sources[0].read_shard_parquet == "auto"
    for value in ("yes", 1, "true"):
        src = {"name": "laion", "kind": "webdataset", "paths": ["x/*.tar"], "read_shard_parquet": value}
        with pytest.raises(SpecError, match=r"sources\[0\]\.read_shard_parquet"):
            parse_spec({**base, "sources": [src]})


def test_a_shard_parquet_changed_during_its_tars_scan_is_not_committed(tmp_path):
    """The worker checks the tar and its shard parquet before and after: a parquet rewritten
    after the coordinator listed the unit gives an uncommitted part (scanned again next build)."""
    from bucket_assets.core.raw_index import ScanTask, scan_part, summary_path, unstable_path

    raw = tmp_path / "raw"
    raw.mkdir()
    tar = raw / "00000.tar"
    _tar(tar, {"a": None})
    pq.write_table(pa.Table.from_pylist([_row("a")]), raw / "00000.parquet")
    source = _source(raw)
    listed = webdataset.fingerprint(source, str(tar))
    pq.write_table(pa.Table.from_pylist([_row("a"), _row("b", "failed_to_download", "404")]), raw / "00000.parquet")
    os.utime(raw / "00000.parquet", ns=(1, 1))  # another mtime whatever the clock's resolution
    frag = tmp_path / "frag" / "p.parquet"
    task = ScanTask(source=source.model_dump(mode="json"), unit=str(tar), fingerprint=listed, start=0, stop=None,
                    max_chars=100, max_pixels=10**8, fragment=str(frag))
    summary = scan_part(task)
    assert summary["rows"] == 2 and not summary["stable"]
    assert not Path(summary_path(frag)).exists() and Path(unstable_path(frag)).exists()
    again = scan_part(ScanTask(**{**task.__dict__, "fingerprint": webdataset.fingerprint(source, str(tar))}))
    assert again["stable"] and Path(summary_path(frag)).exists()
