"""Parquet sources with the images inside (issue 14): Hugging Face Hub style files written by
`datasets` itself (the Image feature's {bytes, path} struct, split over several files), plain
binary columns, bad rows as named reasons, row-group-ordered reading, and the scan cache per file."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from bucket_assets.core.sources import ScanStats, read_bytes
from bucket_assets.core.sources import parquet as pqsrc
from bucket_assets.core.sources.parquet import SourceError
from bucket_assets.spec import SpecError, check_paths, parse_spec
from bucket_assets_tests.conftest import run_cli

datasets = pytest.importorskip("datasets")


def _jpeg(seed: int, w: int, h: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocks: not blank, compresses
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


SIZES = [(320, 240), (240, 320), (300, 300), (400, 224), (256, 384), (352, 288)]


def _rows(n: int) -> list[dict]:
    return [{"key": f"img{i:03d}", "bytes": _jpeg(i, *SIZES[i % len(SIZES)]), "text": f"a picture number {i}",
             "aesthetic": 4.0 + (i % 4)} for i in range(n)]


def _hf_files(d: Path, rows: list[dict], files: int = 3, extra: list[dict] | None = None) -> list[Path]:
    """`datasets` writes the rows as data/train-0000k-of-0000n.parquet (its Image feature, its own
    row group size), contiguous shards of the dataset, like the Hub's parquet conversion."""
    d.mkdir(parents=True, exist_ok=True)
    feats = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                               "text": datasets.Value("string"), "aesthetic": datasets.Value("float32")})
    all_rows = rows + (extra or [])
    ds = datasets.Dataset.from_dict(
        {"key": [r["key"] for r in all_rows],
         "image": [None if r["bytes"] is None else {"bytes": r["bytes"], "path": f"{r['key']}.jpg"} for r in all_rows],
         "text": [r["text"] for r in all_rows], "aesthetic": [r["aesthetic"] for r in all_rows]},
        features=feats)
    out = []
    for k in range(files):
        path = d / f"train-{k:05d}-of-{files:05d}.parquet"
        ds.shard(num_shards=files, index=k, contiguous=True).to_parquet(str(path))
        out.append(path)
    return out


def _spec(tmp_path: Path, sources: list[dict], **extra) -> Path:
    d = {"name": "hf", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"), "sources": sources,
         "buckets": {"base_resolutions": [128], "divisible": 8},
         "captions": {"landing_dir": str(tmp_path / "captions"), "selectors": ["text", "sidecar"]},
         "image": {"workers": 2}, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _build(spec: Path, tmp_path: Path) -> dict:
    res = run_cli("build", "--spec", str(spec), env={"DAGSTER_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(yaml.safe_load(spec.read_text())["output_dir"])
    return json.loads((out / "manifest.json").read_text())


def _samples(out: Path) -> dict[str, tuple[bytes, str, dict]]:
    """image_id -> (jpg bytes, caption, sample json) of every shard of an export."""
    got = {}
    for tar in sorted(out.glob("buckets/*/shard-*.tar")):
        with tarfile.open(tar) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name in files:
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(files[name])
                got[meta["image_id"]] = (files[key + ".jpg"], files[key + ".txt"].decode(), meta)
    return got


def test_hub_parquet_with_embedded_images_builds_the_same_pixels_as_the_files(tmp_path):
    rows = _rows(24)
    bad = [
        {"key": "nullimg", "bytes": None, "text": "no image", "aesthetic": 5.0},
        {"key": "junk", "bytes": b"this is not an image", "text": "junk", "aesthetic": 5.0},
        {"key": None, "bytes": rows[0]["bytes"][:-1] + b"\xd9", "text": "no id", "aesthetic": 5.0},
    ]
    files = _hf_files(tmp_path / "hf" / "data", rows, files=3, extra=bad)
    assert all(pq.ParquetFile(f).metadata.num_rows > 0 for f in files)
    # The same images as files with sidecar captions in the same build (ids f_<key>, duplicates
    # kept): the export's pixels must be identical.
    folder = tmp_path / "folder"
    folder.mkdir()
    for r in rows:
        (folder / f"f_{r['key']}.jpg").write_bytes(r["bytes"])
        (folder / f"f_{r['key']}.txt").write_text(r["text"])

    spec = _spec(tmp_path, [{"name": "hf", "kind": "parquet", "path": "hf/data/*.parquet",
                             "columns": {"id": "key", "image": "image", "caption": "text"}, "caption_variant": "text"},
                            {"name": "folder", "kind": "folder", "path": "folder"}],
                 filters={"drop_duplicates": False},
                 image={"workers": 2, "crop": {"strategy": "center"}})  # the corner depends on the id
    m = _build(spec, tmp_path)
    s = m["summary"]
    assert s["images_seen"] == 2 * len(rows) + len(bad)
    assert s["images_exported"] == 2 * len(rows)
    assert s["skipped_missing_image"] == 1 and s["decode_errors"] == 1 and s["skipped_missing_id"] == 1
    assert run_cli("verify", str(tmp_path / "out")).returncode == 0
    got = _samples(tmp_path / "out")
    assert set(got) == {r["key"] for r in rows} | {f"f_{r['key']}" for r in rows}
    for r in rows:
        jpg, caption, meta = got[r["key"]]
        assert jpg == got[f"f_{r['key']}"][0], r["key"]
        assert caption.strip() == r["text"]
        assert meta["source"] == "hf" and (meta["src_w"], meta["src_h"]) == SIZES[int(r["key"][3:]) % len(SIZES)]


def test_noop_rescan_opens_no_parquet_and_a_changed_file_rescans_alone(tmp_path):
    from bucket_assets.core.db import connect
    from bucket_assets.core.scan_cache import ScanCache
    from bucket_assets.distributed import LocalCompute

    files = _hf_files(tmp_path / "data", _rows(9), files=3)
    spec = parse_spec({"name": "x", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                       "sources": [{"name": "hf", "kind": "parquet", "path": str(tmp_path / "data" / "*.parquet"),
                                    "columns": {"id": "key", "image": "image", "caption": "text"}}]})

    def build():
        out = ScanCache(spec, LocalCompute(1)).build(lambda: connect(spec.db_path))
        with connect(spec.db_path) as con:
            rows = con.execute("SELECT image_id, location, data_offset, sha256, width FROM raw_index ORDER BY row_id").fetchall()
        return out, rows

    out, rows = build()
    assert (out.units_scanned, out.units_reused) == (3, 0) and len(rows) == 9
    assert [r[1] for r in rows] == sorted(str(f) for f in files for _ in range(3)) and rows[4][2] == 1
    opened = []
    orig = pq.ParquetFile

    class Watch(orig):
        def __init__(self, source, *a, **kw):
            opened.append(source)
            super().__init__(source, *a, **kw)

    import unittest.mock as mock

    with mock.patch.object(pq, "ParquetFile", Watch), mock.patch.object(pq, "read_metadata", side_effect=AssertionError):
        out2, again = build()
    assert opened == [] and (out2.units_scanned, out2.units_reused) == (0, 3) and again == rows
    _hf_files(tmp_path / "new", _rows(12)[9:], files=1)[0].replace(files[1])
    out3, third = build()
    assert (out3.units_scanned, out3.units_reused) == (1, 2)
    assert [r[0] for r in third] == [r[0] for r in rows[:3]] + ["img009", "img010", "img011"] + [r[0] for r in rows[6:]]


def test_bad_rows_are_named_reasons_and_ids_default_to_file_and_row(tmp_path):
    good = _jpeg(1, 200, 160)
    t = pa.table({
        "img": pa.array([good, None, b"", b"GIF89a-not-really", good], pa.binary()),
        "caption": ["ok", "null", "empty", "junk", "ok too"],
        "score": [1.0, 2.0, 3.0, 4.0, float("nan")],
        "clip": [0.5, 0.1, 0.2, 0.3, 0.4], "tag": ["UNLIKELY", "NSFW", None, None, None],
    })
    path = tmp_path / "part-7.parquet"
    pq.write_table(t, path, row_group_size=2)
    src = parse_spec({"name": "x", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                      "sources": [{"name": "b", "kind": "parquet", "path": str(path),
                                   "columns": {"image": "img", "similarity": "clip", "nsfw": "tag"}}]}).sources[0]
    recs = list(pqsrc.scan(src, ScanStats(), 100))
    assert (recs[0].similarity, recs[0].nsfw, recs[1].nsfw) == (0.5, "UNLIKELY", "NSFW")
    assert [r.image_id for r in recs] == [f"part-7-{i}" for i in range(5)]
    assert [r.issue for r in recs] == [None, "missing_image", "missing_image", None, None]
    assert "row 1: column 'img' is null" in recs[1].issue_detail and "is empty" in recs[2].issue_detail
    assert (recs[0].location, recs[0].member, recs[0].offset, recs[0].size) == (str(path), "img", 0, len(good))
    assert recs[4].offset == 4 and "img" not in recs[4].meta and recs[4].meta["score"] != recs[4].meta["score"]
    # The bytes read back by location equal the scanned ones.
    assert read_bytes(recs[4].location, recs[4].member, recs[4].offset, recs[4].size) == good
    with pytest.raises(OSError, match="not the 3 scanned"):
        read_bytes(str(path), "img", 0, 3)
    with pytest.raises(OSError, match="beyond its 5 rows"):
        read_bytes(str(path), "img", 9, None)


@pytest.mark.parametrize("column, needle", [
    (pa.array(["a"]), "must be a struct {bytes, path} (the Hugging Face Image feature) or binary, got string"),
    (pa.array([{"path": "a.jpg"}]), "must be a struct {bytes, path}"),
])
def test_an_image_column_of_another_type_is_the_sources_error(tmp_path, column, needle):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"image": column, "caption": ["c"]}), path)
    src = parse_spec({"name": "x", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                      "sources": [{"name": "b", "kind": "parquet", "path": str(path), "columns": {"image": "image"}}]}
                     ).sources[0]
    with pytest.raises(SourceError, match="column 'image' \\(columns.image\\) " + needle.replace("{", "\\{")
                       .replace("}", "\\}").replace("(", "\\(").replace(")", "\\)")):
        list(pqsrc.scan(src, ScanStats(), 100))


def test_spec_forms_for_paths_and_the_image_column(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for n in ("b.parquet", "a.parquet", "c.other"):
        pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary()), "caption": ["c"]}), d / n)
    base = {"name": "x", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w")}

    def src(**kw):
        return {"name": "b", "kind": "parquet", "columns": {"image": "image"}, **kw}

    spec = parse_spec({**base, "sources": [src(path=["d/b.parquet", "d/*.parquet"])]}, tmp_path)
    check_paths(spec)
    assert pqsrc.files(spec.sources[0]) == [str(d / "a.parquet"), str(d / "b.parquet")]  # sorted, once each
    with pytest.raises(SpecError, match=r"^spec error at sources\[0\]\.path\[1\]: no file matches .*/d/\*\.nope$"):
        check_paths(parse_spec({**base, "sources": [src(path=["d/a.parquet", "d/*.nope"])]}, tmp_path))
    with pytest.raises(SpecError, match="needs image_dir .* or columns.image"):
        parse_spec({**base, "sources": [{"name": "b", "kind": "parquet", "path": "d/a.parquet"}]}, tmp_path)
    with pytest.raises(SpecError, match="both say where the images are"):
        parse_spec({**base, "sources": [src(path="d/a.parquet", image_dir="d")]}, tmp_path)
    with pytest.raises(SpecError, match="columns.id is needed with image_dir"):
        parse_spec({**base, "sources": [{"name": "b", "kind": "parquet", "path": "d/a.parquet", "image_dir": "d",
                                         "columns": {"id": None}}]}, tmp_path)
    with pytest.raises(SpecError, match="columns.image is for kind: parquet"):
        parse_spec({**base, "sources": [{"name": "u", "kind": "urls", "path": "d/a.parquet",
                                         "columns": {"image": "image"}}]}, tmp_path)
    urls = parse_spec({**base, "sources": [{"name": "u", "kind": "urls", "path": ["d/b.parquet", "d/a.parquet"]}]},
                      tmp_path)
    from bucket_assets.core.sources import urls as urlsrc

    assert urlsrc.files(urls.sources[0]) == [str(d / "a.parquet"), str(d / "b.parquet")]


def test_render_reads_each_row_group_once_in_source_order(tmp_path, monkeypatch):
    """The worker's reader streams one row group at a time: reading rows in order opens one
    batch iterator per group and holds one small batch, a row behind the cursor restarts its
    group, and a replaced file is reopened."""
    imgs = [_jpeg(i, 64, 48) for i in range(10)]
    path = tmp_path / "g.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(imgs)])}),
                   path, row_group_size=3)
    opened = []
    orig = pq.ParquetFile.iter_batches

    def counted(self, *a, row_groups=None, **kw):
        opened.append(tuple(row_groups))
        return orig(self, *a, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    monkeypatch.setattr(pqsrc._ImageReader, "BATCH", 2)
    reader = pqsrc._ImageReader()
    for row, b in enumerate(imgs):
        assert reader.read(str(path), "image", row, len(b)) == b
        assert len(reader.cursor[3]) <= 2  # one batch of one group held
    assert opened == [(0,), (1,), (2,), (3,)]
    assert reader.read(str(path), "image", 7, len(imgs[7])) == imgs[7] and opened[-1] == (2,)  # behind: restart
    assert reader.read(str(path), "image", 8, len(imgs[8])) == imgs[8] and len(opened) == 5
    # A file replaced under the reader is reopened (its stat changed), not read from the old footer.
    pq.write_table(pa.table({"image": pa.array([{"bytes": imgs[9], "path": None}] * 2)}), path)
    assert reader.read(str(path), "image", 1, len(imgs[9])) == imgs[9]
    reader.close()
