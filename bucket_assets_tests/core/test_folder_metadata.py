"""Imagefolder metadata in folder sources (issue 14): metadata.jsonl / metadata.csv rows keyed by
file_name give captions and source metadata; every row is an image's or a named reason; the
scan cache rescans what a changed metadata file touches and a no-op rebuild opens nothing."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bucket_assets.core import scan_cache
from bucket_assets.core.db import connect
from bucket_assets.core.scan_cache import ScanCache
from bucket_assets.core.sources import ScanStats, scan_source
from bucket_assets.core.sources import folder as folder_mod
from bucket_assets.core.sources.parquet import SourceError
from bucket_assets.distributed import LocalCompute
from bucket_assets.spec import SpecError, parse_spec
from bucket_assets_tests.test_scan_cache import _Opens

MAX_CHARS = 1000


def _jpeg(seed: int, w: int = 96, h: int = 64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _images(d: Path, *names: str, seed: int = 0, w: int = 96, h: int = 64) -> None:
    for i, n in enumerate(names):
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).write_bytes(_jpeg(seed + 10 * i, w, h))


def _jsonl(path: Path, *rows) -> None:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))


def _spec(tmp_path: Path, folder: Path, **source):
    return parse_spec({"name": "t", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                       "sources": [{"name": "local", "kind": "folder", "path": str(folder), **source}],
                       "image": {"workers": 1}, "captions": {"landing_dir": str(tmp_path / "captions"),
                                                             "max_chars": MAX_CHARS}})


def _scan(spec) -> tuple[list, ScanStats]:
    stats = ScanStats()
    return list(scan_source(spec.sources[0], stats, MAX_CHARS)), stats


def _by(recs) -> dict:
    return {(r.image_id, r.issue): r for r in recs}


def test_jsonl_rows_give_captions_and_metadata_and_every_bad_row_a_reason(tmp_path):
    root = tmp_path / "local"
    _images(root, "a.jpg", "b.jpg", "c.jpg", "e.jpg", "sub/d.jpg")
    (root / "c.txt").write_text("sidecar of c")
    (root / "e.txt").write_text("sidecar of e")
    (root / "notes.txt").write_text("not an image")
    _jsonl(root / "metadata.jsonl",
           {"file_name": "a.jpg", "text": "caption a", "aesthetic": 6.5, "license": "cc-by"},
           {"file_name": "./b.jpg", "text": "  ", "alt": "fallback b"},
           {"file_name": "sub/d.jpg", "text": "caption d", "aesthetic": 4.0},
           {"file_name": "e.jpg", "text": ""},                    # empty, no fallback value: the sidecar
           {"file_name": "gone.jpg", "text": "no such file"},
           {"file_name": "../outside.jpg", "text": "x"},
           {"file_name": "/etc/abs.jpg", "text": "x"},
           {"file_name": "a.jpg", "text": "second row for a"},
           b"{not json",
           b"[1, 2]",
           {"text": "no file_name"},
           {"file_name": "notes.txt"},
           {"file_name": "nodir/x.jpg"},
           b"",                                                      # blank lines are not rows
           {"file_name": "sub", "text": "a directory"})
    spec = _spec(tmp_path, root, columns={"caption": "text", "fallback_caption": "alt", "license": "license"})
    recs, stats = _scan(spec)
    got = [(r.image_id, r.issue) for r in recs]
    # Directories in walk order (their images sorted, each first row's duplicates after it),
    # then the metadata file's rows that describe no image, in file order.
    assert got == [
        ("a", None), ("a", "duplicate_id"), ("b", None), ("c", None), ("e", None), ("sub/d", None),
        ("gone", "missing_file"), ("metadata.jsonl:6", "unsafe_path"), ("metadata.jsonl:7", "unsafe_path"),
        ("metadata.jsonl:9", "metadata_invalid"), ("metadata.jsonl:10", "metadata_invalid"),
        ("metadata.jsonl:11", "metadata_invalid"), ("notes", "not_an_image"), ("nodir/x", "missing_file"),
        ("sub", "not_an_image"),
    ]
    by = _by(recs)
    a = by[("a", None)]
    assert (a.caption, a.caption_field, a.license) == ("caption a", "text", "cc-by")
    assert a.meta == {"text": "caption a", "aesthetic": 6.5, "license": "cc-by"}  # all but file_name
    assert by[("a", "duplicate_id")].issue_detail == (
        "metadata.jsonl line 8: a second row for 'a.jpg' (the row on line 1 is used)")
    assert (by[("b", None)].caption, by[("b", None)].caption_field) == ("fallback b", "alt")
    c = by[("c", None)]
    assert (c.caption, c.caption_field, c.meta) == ("sidecar of c", "txt", None)  # no row: as before
    assert (by[("e", None)].caption, by[("e", None)].caption_field) == ("sidecar of e", "txt")
    assert by[("sub/d", None)].caption == "caption d"
    assert by[("gone", "missing_file")].issue_detail == "metadata.jsonl line 5: no file 'gone.jpg'"
    assert "'..'" in by[("metadata.jsonl:6", "unsafe_path")].issue_detail
    assert "absolute" in by[("metadata.jsonl:7", "unsafe_path")].issue_detail
    assert by[("metadata.jsonl:9", "metadata_invalid")].issue_detail.startswith("metadata.jsonl line 9: not JSON (")
    assert by[("metadata.jsonl:10", "metadata_invalid")].issue_detail == (
        "metadata.jsonl line 10: not a JSON object (a list)")
    assert "file_name is missing" in by[("metadata.jsonl:11", "metadata_invalid")].issue_detail
    assert "'sub' is not named like an image" in by[("sub", "not_an_image")].issue_detail
    assert by[("nodir/x", "missing_file")].issue_detail == "metadata.jsonl line 13: no directory 'nodir'"
    # The metadata file is not an image, and nothing was a whole-file skip.
    assert not any(r.image_id.startswith("metadata") and r.issue is None for r in recs)
    assert stats.files == {} and stats.counts == {}


def test_csv_metadata_quoting_bom_field_counts_and_a_header_without_file_name(tmp_path):
    root = tmp_path / "local"
    _images(root, "x.jpg", "y.jpg", "z.jpg")
    (root / "metadata.csv").write_bytes(
        b"\xef\xbb\xbffile_name,text,aesthetic\r\n"
        b'x.jpg,"a caption, with a comma\nand a newline",5.5\r\n'
        b"y.jpg,caf\xe9 latin-1,3\r\n"   # not UTF-8
        b"z.jpg,too,many,fields\r\n"
        b"\r\n"
        b"w.jpg,no such image,1\r\n")
    recs, _stats = _scan(_spec(tmp_path, root))
    assert [(r.image_id, r.issue) for r in recs] == [
        ("x", None), ("y", None), ("z", None), ("metadata.csv:5", "metadata_invalid"), ("w", "missing_file")]
    by = _by(recs)
    assert by[("x", None)].caption == "a caption, with a comma\nand a newline"
    assert by[("x", None)].meta == {"text": "a caption, with a comma\nand a newline", "aesthetic": "5.5"}
    y = by[("y", None)]
    assert y.caption == "caf\ufffd latin-1" and "caption_not_utf8" in y.notes
    assert by[("z", None)].caption is None  # its row is malformed: no row, no sidecar
    assert by[("metadata.csv:5", "metadata_invalid")].issue_detail == (
        "metadata.csv line 5: 4 fields, the header has 3")
    assert by[("w", "missing_file")].issue_detail == "metadata.csv line 7: no file 'w.jpg'"

    (root / "metadata.csv").write_text("name,text\nx.jpg,a\n")
    with pytest.raises(SourceError, match=r"^source local: .*metadata.csv line 1: the header has no file_name "
                                          r"column \(it has 'name', 'text'\)$"):
        _scan(_spec(tmp_path, root))
    (root / "metadata.csv").write_text('file_name,text\nx.jpg,"unterminated\ny.jpg,b\n')
    with pytest.raises(SourceError, match=r"metadata.csv the row starting on line 2 \(read to line 3\): "
                                          r"not valid CSV \(unexpected end of data\)$"):
        _scan(_spec(tmp_path, root))


def test_both_metadata_files_in_one_directory_is_a_one_line_error(tmp_path):
    root = tmp_path / "local"
    _images(root, "sub/x.jpg")
    _jsonl(root / "sub" / "metadata.jsonl", {"file_name": "x.jpg", "text": "j"})
    (root / "sub" / "metadata.csv").write_text("file_name,text\nx.jpg,c\n")
    spec = _spec(tmp_path, root)
    with pytest.raises(SourceError, match=r"^source local: .*/sub holds both metadata.jsonl and metadata.csv; "
                                          r"keep one \(one metadata file per directory\)$"):
        _scan(spec)
    with pytest.raises(SourceError, match="holds both"):  # the build's planning says the same
        ScanCache(spec, LocalCompute(1)).build(lambda: connect(spec.db_path))


def test_the_nearest_metadata_file_describes_a_directory(tmp_path):
    root = tmp_path / "local"
    _images(root, "top.jpg", "sub/x.jpg", "sub/deep/y.jpg", "other/z.jpg")
    _jsonl(root / "metadata.jsonl", {"file_name": "top.jpg", "text": "top"},
           {"file_name": "sub/x.jpg", "text": "from the root"}, {"file_name": "other/z.jpg", "text": "z from root"})
    _jsonl(root / "sub" / "metadata.jsonl", {"file_name": "x.jpg", "text": "from sub"},
           {"file_name": "deep/y.jpg", "text": "y from sub"})
    recs, _ = _scan(_spec(tmp_path, root))
    # sub's own file describes sub and sub/deep; the root's row for sub/x is shadowed by it.
    assert [(r.image_id, r.issue, r.caption) for r in recs] == [
        ("top", None, "top"), ("other/z", None, "z from root"), ("sub/x", None, "from sub"),
        ("sub/deep/y", None, "y from sub"), ("sub/x", "metadata_shadowed", "from the root")]
    shadowed = [r for r in recs if r.issue == "metadata_shadowed"][0]
    assert shadowed.issue_detail == ("metadata.jsonl line 2: the images of 'sub' are described by "
                                     "sub/metadata.jsonl (the nearest metadata file)")


def test_unreadable_metadata_long_lines_links_and_non_utf8_names(tmp_path, monkeypatch):
    root = tmp_path / "local"
    _images(root, "a.jpg", "real/b.jpg")
    (root / "a.txt").write_text("sidecar a")
    os.symlink(root / "real", root / "linked")
    name = os.fsdecode(b"n\xe4me.jpg")
    (root / name).write_bytes(_jpeg(9))
    monkeypatch.setattr(folder_mod, "MAX_ROW_BYTES", 200)
    _jsonl(root / "metadata.jsonl", {"file_name": "a.jpg", "text": "x" * 300},  # a line over the limit
           {"file_name": "linked/b.jpg", "text": "through a link"},
           b'{"file_name": "n\xe4me.jpg", "text": "latin-1 name"}',
           {"file_name": "real/b.jpg", "text": "b"})
    recs, stats = _scan(_spec(tmp_path, root))
    by = _by(recs)
    assert by[("a", None)].caption == "sidecar a"  # its only row is unreadable: the sidecar
    assert by[("metadata.jsonl:1", "metadata_invalid")].issue_detail == (
        "metadata.jsonl line 1: the line is longer than 0 MiB")
    assert "'linked' is a symlink" in by[("linked/b", "unsafe_file")].issue_detail
    assert by[("real/b", None)].caption == "b"
    # A row still finds a file whose name is not UTF-8; the index then names it, as any such file.
    bad = by[("n\\xe4me", "name_not_utf8")]
    assert bad.caption == "latin-1 name"
    assert stats.files == {}

    # A metadata file that is a symlink is not read: a whole-file skip, images keep their sidecars.
    (root / "metadata.jsonl").rename(tmp_path / "elsewhere.jsonl")
    os.symlink(tmp_path / "elsewhere.jsonl", root / "metadata.jsonl")
    recs, stats = _scan(_spec(tmp_path, root))
    assert stats.files == {"symlink": 1} and _by(recs)[("a", None)].caption == "sidecar a"
    assert all(r.issue in (None, "name_not_utf8") for r in recs)


def _build(spec):
    out = ScanCache(spec, LocalCompute(1)).build(lambda: connect(spec.db_path))
    with connect(spec.db_path) as con:
        rows = con.execute("SELECT image_id, issue, caption, caption_field, source_meta FROM raw_index "
                           "ORDER BY row_id").fetchall()
    return out, rows


def test_parts_split_a_directory_and_give_the_rows_of_one_scan(tmp_path, monkeypatch):
    root = tmp_path / "local"
    names = [f"i{i:02d}.jpg" for i in range(7)]
    _images(root, *names)
    _jsonl(root / "metadata.jsonl", *[{"file_name": n, "text": f"cap {n}", "k": i} for i, n in enumerate(names)],
           {"file_name": "i05.jpg", "text": "dup"}, {"file_name": "i00.jpg", "text": "dup"})
    spec = _spec(tmp_path, root)
    _out, whole = _build(spec)
    monkeypatch.setattr(scan_cache, "PART_RECORDS", 2)
    other = spec.model_copy(update={"work_dir": str(tmp_path / "work2")})
    out, parts = _build(other)
    assert out.parts_scanned == 5  # 4 parts of the directory + the metadata file
    assert parts == whole
    assert [(r[0], r[1]) for r in whole if r[1]] == [("i00", "duplicate_id"), ("i05", "duplicate_id")]
    assert [json.loads(r[4]) for r in whole if r[0] == "i03"] == [{"text": "cap i03.jpg", "k": 3}]


def test_metadata_changes_rescan_what_they_touch_and_a_noop_rebuild_opens_nothing(tmp_path, monkeypatch):
    root = tmp_path / "local"
    _images(root, "a.jpg", "sub/b.jpg", "plain/c.jpg")
    _jsonl(root / "metadata.jsonl", {"file_name": "a.jpg", "text": "a1"}, {"file_name": "sub/b.jpg", "text": "b1"},
           {"file_name": "sub/new.jpg", "text": "new1"})
    (root / "plain" / "metadata.jsonl").write_text("")  # an empty metadata file: no rows
    spec = _spec(tmp_path, root)
    opens = _Opens(root, monkeypatch)
    with opens.watch() as first:
        out, rows = _build(spec)
    assert any(p.endswith("metadata.jsonl") for p in first)
    assert (out.units_scanned, out.units_reused) == (5, 0)  # 3 directories + 2 metadata files
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("a", None, "a1"), ("plain/c", None, None), ("sub/b", None, "b1"), ("sub/new", "missing_file", "new1")]
    with opens.watch() as second:
        out, again = _build(spec)
    assert second == [] and (out.units_scanned, out.units_reused) == (0, 5) and again == rows

    # A changed metadata file: the root, sub (governed from above) and the metadata unit rescan;
    # plain (its own metadata file) does not.
    _jsonl(root / "metadata.jsonl", {"file_name": "a.jpg", "text": "a2"}, {"file_name": "sub/b.jpg", "text": "b2"},
           {"file_name": "sub/new.jpg", "text": "new2"})
    out, rows = _build(spec)
    assert (out.units_scanned, out.units_reused) == (3, 2)
    assert [r[2] for r in rows] == ["a2", None, "b2", "new2"]
    # The missing image appears: its directory and the metadata unit (its subtree changed) rescan,
    # and the row is the image's, not missing_file any more.
    _images(root, "sub/new.jpg", seed=50)
    out, rows = _build(spec)
    assert (out.units_scanned, out.units_reused) == (2, 3)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("a", None, "a2"), ("plain/c", None, None), ("sub/b", None, "b2"), ("sub/new", None, "new2")]
    fresh = _build(spec.model_copy(update={"work_dir": str(tmp_path / "fresh")}))[1]
    assert fresh == rows


def test_folder_columns_in_the_spec(tmp_path):
    root = tmp_path / "local"
    root.mkdir()
    s = _spec(tmp_path, root).sources[0]
    assert (s.columns.caption, s.columns.fallback_caption) == ("text", None)
    s = _spec(tmp_path, root, columns={"caption": "caption", "fallback_caption": "alt"}).sources[0]
    assert (s.columns.caption, s.columns.fallback_caption) == ("caption", "alt")
    with pytest.raises(SpecError, match=r"^spec error at sources\[0\].columns.id: unknown key$"):
        _spec(tmp_path, root, columns={"id": "x"})


def test_an_imagefolder_with_metadata_builds_an_export_that_accounts_for_every_row(tmp_path):
    import yaml

    from bucket_assets.core.manifest import verify_export
    from bucket_assets.core.shards import read_shard
    from bucket_assets_tests.conftest import materialize_all

    root = tmp_path / "raw" / "local"
    _images(root, "a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", w=240, h=160)
    (root / "c.txt").write_text("sidecar c")
    _jsonl(root / "metadata.jsonl",
           {"file_name": "a.jpg", "text": "caption a", "aesthetic": 6.0, "license": "cc-by"},
           {"file_name": "b.jpg", "text": "caption b", "aesthetic": 4.0},
           {"file_name": "sub/d.jpg", "text": "", "alt": "fallback d", "aesthetic": 5.5},
           {"file_name": "a.jpg", "text": "again"},
           {"file_name": "gone.jpg", "text": "nothing here"},
           {"file_name": "../x.jpg"},
           b"{broken")
    spec = {
        "name": "imgfolder", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
        "sources": [{"name": "local", "kind": "folder", "path": str(root),
                     "columns": {"caption": "text", "fallback_caption": "alt", "license": "license"}}],
        "filters": {"min_similarity": None, "columns": [{"column": "aesthetic", "min": 5.0}]},
        "buckets": {"base_resolutions": [128], "divisible": 8},
        "captions": {"landing_dir": str(tmp_path / "captions"), "selectors": ["sidecar"]},
        "image": {"workers": 1},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert materialize_all(spec_path).success
    verify_export(tmp_path / "out")

    s = json.loads((tmp_path / "out" / "manifest.json").read_text())["summary"]
    skips = {k: v for k, v in s.items() if (k.startswith("skipped_") or k in ("decode_errors", "encode_errors")) and v}
    # 4 images + the 4 rows that describe none of them; each is a sample or one named reason.
    assert s["images_seen"] == 8 and s["images_exported"] == 3
    assert skips == {"skipped_column_filter": 1, "skipped_duplicate_id": 1, "skipped_missing_file": 1,
                     "skipped_unsafe_path": 1, "skipped_metadata_invalid": 1}
    assert s["images_seen"] == s["images_exported"] + sum(skips.values())
    texts, metas = {}, {}
    for shard in sorted((tmp_path / "out").rglob("shard-*.tar")):
        for _key, parts in read_shard(shard):
            m = json.loads(parts["json"])
            texts[m["image_id"]], metas[m["image_id"]] = parts["txt"].decode().removesuffix("\n"), m
    assert texts == {"a": "caption a", "c": "sidecar c", "sub/d": "fallback d"}
    assert metas["a"]["license"] == "cc-by" and metas["c"]["license"] is None
    assert {m["caption_variant"] for m in metas.values()} == {"sidecar"}


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv"])
def test_mangled_metadata_gives_records_or_a_one_line_source_error(tmp_path, name):
    """Random byte damage to a metadata file: every outcome is records (each image once, every
    other row with a reason) or a SourceError, never another exception."""
    root = tmp_path / "local"
    _images(root, "a.jpg", "b.jpg", "sub/c.jpg")
    if name.endswith("jsonl"):
        good = b"".join(json.dumps({"file_name": n, "text": f"t {n}", "v": [1, {"x": "y"}]}).encode() + b"\n"
                        for n in ("a.jpg", "b.jpg", "sub/c.jpg", "d.jpg"))
    else:
        good = b'file_name,text,v\na.jpg,"t, a",1\nb.jpg,t b,2\nsub/c.jpg,"multi\nline",3\nd.jpg,t d,4\n'
    rng = np.random.default_rng(14)
    spec = _spec(tmp_path, root)
    errors = 0
    for _ in range(40):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(0, len(data)))
            data[pos:pos + 1] = bytes([int(rng.choice(list(b'"{}[],\n\r\\/.\x00\xff\xe9a:')))])
        (root / name).write_bytes(bytes(data))
        try:
            recs, _stats = _scan(spec)
        except SourceError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("source local: ")
            errors += 1
            continue
        images = [r.image_id for r in recs if r.location is not None]
        assert sorted(images) == ["a", "b", "sub/c"]
        assert all(r.issue for r in recs if r.location is None)
    assert errors < 40
