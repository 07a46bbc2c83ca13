"""The scan cache (issue 13): raw_index is rebuilt from per-part fragments; only new or changed
source files and directories are scanned, removed ones drop out, a no-op rebuild opens no source
file, and every result equals a scan from scratch."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bucket_assets.core import scan_cache
from bucket_assets.core.atomic import TMP_PREFIX
from bucket_assets.core.db import connect, replace_table
from bucket_assets.core.download import blob_path
from bucket_assets.core.raw_index import (
    FRAGMENT_SCHEMA, RAW_INDEX_SCHEMA, DuplicateIdError, ScanTask, downloads_digest, scan_part, summary_path,
)
from bucket_assets.core.scan_cache import DOWNLOADS_DIGEST_SQL, ScanCache
from bucket_assets.distributed import LocalCompute
from bucket_assets.spec import parse_spec


def _jpeg(seed: int, w: int = 96, h: int = 64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _tar(path: Path, keys: list[str], seed: int = 0) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i, key in enumerate(keys):
            for name, data in ((f"{key}.jpg", _jpeg(seed + i)), (f"{key}.txt", f"caption {key}".encode()),
                               (f"{key}.json", json.dumps({"similarity": 0.4, "url": f"http://x/{key}"}).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _sources(tmp_path: Path) -> Path:
    """Three tars, a parquet + image dir (with a row without an id and one without a file), a
    folder with a subdirectory."""
    raw = tmp_path / "raw"
    (raw / "tars").mkdir(parents=True)
    for n in range(3):
        _tar(raw / "tars" / f"{n:05d}.tar", [f"t{n}-{i}" for i in range(4)], seed=10 * n)
    (raw / "pcb").mkdir()
    for i in range(5):
        (raw / "pcb" / f"p{i}.jpg").write_bytes(_jpeg(100 + i))
    pq.write_table(pa.table({"id": ["p0", "p1", None, "p3", "p4", "p9"],
                             "caption": ["a", "b", "c", "d", "e", "f"]}), raw / "meta.parquet", row_group_size=2)
    (raw / "folder" / "sub").mkdir(parents=True)
    for i in range(3):
        (raw / "folder" / f"f{i}.jpg").write_bytes(_jpeg(200 + i))
        (raw / "folder" / "sub" / f"s{i}.jpg").write_bytes(_jpeg(300 + i))
    (raw / "folder" / "f0.txt").write_text("folder caption")
    return raw


def _spec(tmp_path: Path, raw: Path, work: str = "work", **extra):
    d = {"name": "t", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / work),
         "sources": [
             {"name": "laion", "kind": "webdataset", "paths": [str(raw / "tars" / "*.tar")]},
             {"name": "pcb", "kind": "parquet", "path": str(raw / "meta.parquet"), "image_dir": str(raw / "pcb")},
             {"name": "folder", "kind": "folder", "path": str(raw / "folder")},
         ],
         "image": {"workers": 1}, "captions": {"landing_dir": str(tmp_path / "captions")}}
    d.update(extra)
    return parse_spec(d)


def _build(spec, workers: int = 1):
    """One raw_index build into the spec's work dir catalog: (outcome, rows)."""
    db = lambda: connect(spec.db_path)  # noqa: E731
    out = ScanCache(spec, LocalCompute(workers)).build(db)
    with connect(spec.db_path) as con:
        rows = con.execute("SELECT * FROM raw_index ORDER BY row_id").to_arrow_table()
    assert rows.schema.equals(RAW_INDEX_SCHEMA)
    return out, rows.to_pylist()


def _fresh(tmp_path: Path, spec, name: str):
    """The same spec built from nothing in another work dir (locations are the sources')."""
    other = spec.model_copy(update={"work_dir": str(tmp_path / name)})
    return _build(other)[1]


def _counts(out) -> tuple[int, int, int]:
    return out.units_scanned, out.units_reused, out.units_removed


def test_rebuild_scans_only_what_changed_and_equals_a_clean_scan(tmp_path):
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    out, rows = _build(spec)
    # 3 tars, the parquet unit, 2 folder directories.
    assert _counts(out) == (6, 0, 0) and len(rows) == 12 + 6 + 6
    assert [r["row_id"] for r in rows] == list(range(len(rows)))
    assert [r["source"] for r in rows] == ["laion"] * 12 + ["pcb"] * 6 + ["folder"] * 6
    assert {r["image_id"]: r["issue"] for r in rows if r["source"] == "pcb"} == {
        "p0": None, "p1": None, "meta-2": "missing_id", "p3": None, "p4": None, "p9": "missing_file"}
    assert [r["image_id"] for r in rows if r["source"] == "folder"] == ["f0", "f1", "f2", "sub/s0", "sub/s1", "sub/s2"]

    out, again = _build(spec)
    assert _counts(out) == (0, 6, 0) and again == rows

    # A tar rewritten: only it is scanned again.
    _tar(raw / "tars" / "00001.tar", ["t1-0", "t1-new"], seed=77)
    out, rows = _build(spec)
    assert _counts(out) == (1, 5, 0)
    assert rows == _fresh(tmp_path, spec, "w1")
    assert [r["image_id"] for r in rows if r["source"] == "laion"][4:6] == ["t1-0", "t1-new"]

    # A tar removed, one added; an image of the parquet's dir replaced; a file in the subdir.
    (raw / "tars" / "00000.tar").unlink()
    _tar(raw / "tars" / "00009.tar", ["t9-0"], seed=90)
    (raw / "pcb" / "p3.jpg").write_bytes(_jpeg(999, 128, 64))
    (raw / "folder" / "sub" / "s9.jpg").write_bytes(_jpeg(400))
    out, rows = _build(spec)
    assert _counts(out) == (3, 3, 1)  # the new tar, the parquet unit, folder/sub; 00000.tar removed
    assert rows == _fresh(tmp_path, spec, "w2")
    assert next(r for r in rows if r["image_id"] == "p3")["width"] == 128
    # What the removed and changed units left is gone: one fragment and summary per current part.
    files = sorted(p.name for p in (Path(spec.work_dir) / "scan").rglob("*"))
    assert len([f for f in files if f.endswith(".parquet")]) == len([f for f in files if f.endswith(".json")]) == 6
    assert not [f for f in files if "unstable" in f or f.startswith(TMP_PREFIX)]

    # A settings change (max_chars) scans everything again; a source removed from the spec drops it.
    spec2 = spec.model_copy(update={"captions": spec.captions.model_copy(update={"max_chars": 5})})
    out, rows = _build(spec2)
    assert _counts(out) == (6, 0, 0)
    assert next(r for r in rows if r["image_id"] == "f0")["caption"] == "folde"
    spec3 = spec.model_copy(update={"sources": spec.sources[:2]})
    out, rows = _build(spec3)
    assert out.units_removed == 2 and not (Path(spec.work_dir) / "scan" / "folder").exists()


def test_parts_give_the_same_rows_as_one_scan(tmp_path, monkeypatch):
    raw = _sources(tmp_path)
    # A URL source of two files (no url_downloads table: every row not_downloaded), ids repeating
    # within a file, across files and across parts.
    (raw / "urls").mkdir()
    pq.write_table(pa.table({"id": ["u0", "u1", "u0", None, "u2"], "url": [f"http://h/{i}" for i in range(5)],
                             "caption": list("abcde")}), raw / "urls" / "a.parquet")
    pq.write_table(pa.table({"id": ["u1", "u3", "u2"], "url": ["http://h/x", "http://h/y", "http://h/z"],
                             "caption": list("xyz")}), raw / "urls" / "b.parquet")
    extra = {"name": "web", "kind": "urls", "path": str(raw / "urls" / "*.parquet")}
    spec = _spec(tmp_path, raw)
    spec = spec.model_copy(update={"sources": [*spec.sources, parse_spec({
        "name": "x", "output_dir": "/o", "work_dir": "/w", "sources": [extra]}).sources[0]]})
    _out, whole = _build(spec)
    monkeypatch.setattr(scan_cache, "PART_RECORDS", 2)
    out, parted = _build(spec.model_copy(update={"work_dir": str(tmp_path / "parted")}))
    assert out.parts_scanned > out.units_scanned
    assert parted == whole
    # On two pool workers (the parts run in other processes), the same rows again.
    out, pooled = _build(spec.model_copy(update={"work_dir": str(tmp_path / "pooled")}), workers=2)
    assert pooled == whole
    web = [(r["image_id"], r["issue"], r["issue_detail"]) for r in whole if r["source"] == "web"]
    a, b = str(raw / "urls" / "a.parquet"), str(raw / "urls" / "b.parquet")
    assert web == [
        ("u0", "not_downloaded", "no download result for this URL: materialize url_downloads"),
        ("u1", "not_downloaded", "no download result for this URL: materialize url_downloads"),
        ("u0", "duplicate_id", f"{a}: row 2: an earlier row has this id"),
        ("a-3", "missing_id", f"{a}: row 3 has a null id"),
        ("u2", "not_downloaded", "no download result for this URL: materialize url_downloads"),
        ("u1", "duplicate_id", f"{b}: row 0: an earlier row has this id"),
        ("u3", "not_downloaded", "no download result for this URL: materialize url_downloads"),
        ("u2", "duplicate_id", f"{b}: row 2: an earlier row has this id"),
    ]
    dup = next(r for r in whole if r["source"] == "web" and r["image_id"] == "u1" and r["issue"] == "duplicate_id")
    assert dup["url"] is None and dup["caption"] is None and json.loads(dup["source_meta"])["url"] == "http://h/x"
    # The legacy reader (one pass, one `seen` set over the files) agrees.
    from bucket_assets.core.sources import ScanStats, scan_source

    legacy = [(r.image_id, r.issue, r.issue_detail) for r in scan_source(spec.sources[3], ScanStats(), 20000, {}, "/s")]
    assert legacy == web


def test_same_id_in_two_files_of_one_source_is_kept_and_in_two_sources_fails_in_sql(tmp_path):
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "b").mkdir()
    _tar(raw / "a" / "00000.tar", ["k0", "k1"])
    _tar(raw / "a" / "00001.tar", ["k1", "k2"], seed=5)  # k1 again in the same source: both rows
    base = {"name": "t", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "image": {"workers": 1}, "captions": {"landing_dir": str(tmp_path / "c")}}
    one = parse_spec({**base, "sources": [{"name": "a", "kind": "webdataset", "paths": [str(raw / "a" / "*.tar")]}]})
    _out, rows = _build(one)
    assert [r["image_id"] for r in rows] == ["k0", "k1", "k1", "k2"] and all(r["issue"] is None for r in rows)
    # (filtered_images decides the second k1 is a duplicate_id, as before.)

    _tar(raw / "b" / "00000.tar", ["z", "k2", "k0"], seed=9)
    two = parse_spec({**base, "sources": [
        {"name": "a", "kind": "webdataset", "paths": [str(raw / "a" / "*.tar")]},
        {"name": "b", "kind": "webdataset", "paths": [str(raw / "b" / "*.tar")]}]})
    with pytest.raises(DuplicateIdError) as err:
        _build(two)
    # The first row (in spec order) whose id an earlier source has: b's k2, before its k0.
    assert str(err.value) == "image_id 'k2' appears in two sources: 'a' and 'b'"
    with connect(one.db_path) as con:  # the failed build changed nothing
        assert con.execute("SELECT count(*) FROM raw_index").fetchone()[0] == 4
    # Its scan work is kept: with the dup source fixed, only b's tar is scanned again.
    _tar(raw / "b" / "00000.tar", ["z"], seed=9)
    out, rows = _build(two)
    assert _counts(out) == (1, 2, 0) and [r["image_id"] for r in rows] == ["k0", "k1", "k1", "k2", "z"]


def test_rows_without_an_id_are_not_duplicates_across_sources(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("m1", "m2"):
        (raw / name).mkdir()
        pq.write_table(pa.table({"id": pa.array([None], pa.string()), "caption": ["x"]}), raw / name / "meta.parquet")
    spec = parse_spec({"name": "t", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                       "captions": {"landing_dir": str(tmp_path / "c")}, "sources": [
                           {"name": n, "kind": "parquet", "path": str(raw / n / "meta.parquet"),
                            "image_dir": str(raw / n)} for n in ("m1", "m2")]})
    _out, rows = _build(spec)
    assert [(r["source"], r["image_id"], r["issue"]) for r in rows] == [
        ("m1", "meta-0", "missing_id"), ("m2", "meta-0", "missing_id")]


class _Opens:
    """Source files opened while armed: Python-level opens (audit hook) and pyarrow's (patched)."""

    hooked = False
    armed: list | None = None

    def __init__(self, root: Path, monkeypatch):
        self.root = str(root)
        if not _Opens.hooked:
            sys.addaudithook(_Opens._hook)
            _Opens.hooked = True
        for fn in ("ParquetFile", "read_schema", "read_metadata", "read_table"):
            orig = getattr(pq, fn)

            def wrapped(path, *a, _orig=orig, **kw):
                _Opens._note(path)
                return _orig(path, *a, **kw)

            monkeypatch.setattr(pq, fn, wrapped)

    @staticmethod
    def _hook(event, args):
        if event == "open" and _Opens.armed is not None:
            _Opens._note(args[0])

    @staticmethod
    def _note(path):
        if _Opens.armed is not None and isinstance(path, (str, os.PathLike)):
            _Opens.armed.append(os.fspath(path))

    @contextlib.contextmanager
    def watch(self):
        _Opens.armed = []
        try:
            yield _Opens.armed
        finally:
            seen = _Opens.armed
            _Opens.armed = None
            seen[:] = [p for p in seen if p.startswith(self.root)]


def test_noop_rebuild_opens_no_source_file(tmp_path, monkeypatch):
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    opens = _Opens(raw, monkeypatch)
    with opens.watch() as first:
        _out, rows = _build(spec)
    assert any(p.endswith(".tar") for p in first) and any(p.endswith("meta.parquet") for p in first)
    assert any(p.endswith("f0.jpg") for p in first)  # the hook does see the scan's opens
    with opens.watch() as second:
        out, again = _build(spec)
    assert second == [] and _counts(out) == (0, 6, 0) and again == rows


def test_noop_rebuild_keeps_raw_index_and_a_change_rewrites_it(tmp_path):
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    _out, rows = _build(spec)
    # A marker in one row: a no-op build that rewrote raw_index from the fragments would lose it.
    with connect(spec.db_path) as con:
        con.execute("UPDATE raw_index SET caption = 'marker' WHERE row_id = 0")
    out, again = _build(spec)
    assert _counts(out) == (0, 6, 0) and again[0]["caption"] == "marker" and again[1:] == rows[1:]
    # A changed tar: the table is written again from every part and equals a clean scan.
    _tar(raw / "tars" / "00002.tar", ["t2-0", "t2-new"], seed=5)
    out, rows = _build(spec)
    assert _counts(out) == (1, 5, 0) and rows == _fresh(tmp_path, spec, "w1")
    assert "marker" not in [r["caption"] for r in rows]


def test_parts_added_after_the_last_ones_are_appended_and_others_rewrite_the_index(tmp_path):
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    spec = spec.model_copy(update={"sources": spec.sources[:1]})  # the tars only
    _out, rows = _build(spec)
    with connect(spec.db_path) as con:
        con.execute("UPDATE raw_index SET caption = 'marker' WHERE row_id = 0")
    # A tar that sorts after the others: its rows are appended, the table's rows stay (the
    # marker survives) and otherwise equal a clean scan.
    _tar(raw / "tars" / "00005.tar", ["t5-0", "t5-1"], seed=50)
    out, rows = _build(spec)
    fresh = _fresh(tmp_path, spec, "w1")
    assert _counts(out) == (1, 3, 0) and rows[0]["caption"] == "marker" and rows[1:] == fresh[1:]
    assert [r["row_id"] for r in rows] == list(range(14))
    # One that sorts before the last: every row after it moves, so the table is written again.
    _tar(raw / "tars" / "00003.tar", ["t3-0"], seed=30)
    out, rows = _build(spec)
    assert _counts(out) == (1, 4, 0) and rows == _fresh(tmp_path, spec, "w2")
    assert "marker" not in [r["caption"] for r in rows]
    # A table written by a version that recorded no part count is rewritten, not appended to.
    with connect(spec.db_path) as con:
        con.execute("UPDATE raw_index SET caption = 'marker' WHERE row_id = 0")
        con.execute("ALTER TABLE raw_index_state DROP COLUMN parts")
    _tar(raw / "tars" / "00007.tar", ["t7-0"], seed=70)
    out, rows = _build(spec)
    assert rows == _fresh(tmp_path, spec, "w3") and rows[0]["caption"] != "marker"


def test_a_file_that_changes_while_it_is_scanned_is_not_cached(tmp_path, monkeypatch):
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    from bucket_assets.core import raw_index

    target = raw / "tars" / "00001.tar"
    probe = raw_index._probe_task
    touched = []

    def probe_and_touch(task):
        if task[0] == str(target) and not touched:  # the file is rewritten under the scan
            touched.append(1)
            st = target.stat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return probe(task)

    monkeypatch.setattr(raw_index, "_probe_task", probe_and_touch)
    out, rows = _build(spec)
    assert out.units_changed_while_scanned == 1 and len(rows) == 24
    assert any("00001.tar changed while it was scanned" in n for n in out.stats.notes)
    scan = Path(spec.work_dir) / "scan" / "laion"
    assert len(list(scan.glob("*.json"))) == 2  # the other two tars are committed, not this one
    assert not list(scan.glob("*unstable*"))  # used by that build only
    monkeypatch.setattr(raw_index, "_probe_task", probe)
    out, again = _build(spec)
    assert _counts(out) == (1, 5, 0) and out.units_changed_while_scanned == 0 and again == rows
    assert len(list(scan.glob("*.json"))) == 3

    # A folder image rewritten while its directory is scanned: that part is not kept either.
    image = raw / "folder" / "sub" / "s1.jpg"
    touched.clear()
    target = image

    monkeypatch.setattr(raw_index, "_probe_task", probe_and_touch)
    (raw / "folder" / "sub" / "s9.jpg").write_bytes(_jpeg(400))  # the directory changed: scanned again
    out, rows = _build(spec)
    assert touched and out.units_changed_while_scanned == 1 and _counts(out) == (1, 5, 0)
    assert any("sub changed while it was scanned" in n for n in out.stats.notes)
    monkeypatch.setattr(raw_index, "_probe_task", probe)
    out, again = _build(spec)
    assert _counts(out) == (1, 5, 0) and again == rows


def test_a_half_written_or_uncommitted_fragment_is_never_used(tmp_path):
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    _out, rows = _build(spec)
    scan = Path(spec.work_dir) / "scan" / "laion"
    frag = sorted(scan.glob("*.parquet"))[0]
    # A kill between the fragment's rename and its summary's: a fragment, but no summary.
    Path(summary_path(frag)).unlink()
    frag.write_bytes(b"PAR1 half written")
    # A kill mid-write: the temp file atomic_writer left.
    stale = scan / f"{TMP_PREFIX}{frag.name}.12345.678"
    stale.write_bytes(b"PAR1 torn")
    out, again = _build(spec)
    assert _counts(out) == (1, 5, 0) and again == rows
    assert not stale.exists() and pq.read_table(frag).num_rows == 4
    # A summary that does not parse is no commit either.
    Path(summary_path(frag)).write_text("{not json")
    out, again = _build(spec)
    assert _counts(out) == (1, 5, 0) and again == rows


def _url_setup(tmp_path: Path):
    """A URL source of two files and a url_downloads table made by hand (no network)."""
    from bucket_assets.core.url_downloads import SCHEMA as URL_DOWNLOADS_SCHEMA

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "url": ["http://h/a", "http://h/b"], "caption": ["ca", "cb"]}),
                   raw / "0.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], "url": ["http://h/c", "http://h/d"], "caption": ["cc", "cd"]}),
                   raw / "1.parquet")
    spec = parse_spec({"name": "t", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                       "captions": {"landing_dir": str(tmp_path / "c")}, "image": {"workers": 1},
                       "sources": [{"name": "web", "kind": "urls", "path": str(raw / "*.parquet")}]})
    store = spec.downloads_dir
    rows = []
    for i, iid in enumerate("abcd"):
        data = _jpeg(500 + i)
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        blob_path(store, sha).parent.mkdir(parents=True, exist_ok=True)
        blob_path(store, sha).write_bytes(data)
        rows.append({"source": "web", "image_id": iid, "url": f"http://h/{iid}", "status": "ok", "detail": None,
                     "http_status": 200, "sha256": sha, "bytes": len(data), "content_type": "image/jpeg",
                     "attempts": 1, "final_url": None})

    def downloads(rows):
        with connect(spec.db_path) as con:
            replace_table(con, "url_downloads", pa.Table.from_pylist(rows, schema=URL_DOWNLOADS_SCHEMA))

    return spec, rows, downloads


def test_url_parts_follow_their_download_rows(tmp_path):
    spec, rows, downloads = _url_setup(tmp_path)
    downloads(rows[:3])  # d not fetched yet
    out, first = _build(spec)
    assert _counts(out) == (2, 0, 0)
    assert [(r["image_id"], r["issue"], r["width"]) for r in first] == [
        ("a", None, 96), ("b", None, 96), ("c", None, 96), ("d", "not_downloaded", None)]
    out, again = _build(spec)
    assert _counts(out) == (0, 2, 0) and again == first
    # d fetched: only the file holding d is scanned again.
    downloads(rows)
    out, second = _build(spec)
    assert _counts(out) == (1, 1, 0) and second[3]["issue"] is None and second[:3] == first[:3]
    # a now failed (a new row for it): its file is scanned again, the other one is not.
    downloads([{**rows[0], "status": "http_404", "detail": "HTTP 404", "sha256": None}, *rows[1:]])
    out, third = _build(spec)
    assert _counts(out) == (1, 1, 0)
    assert (third[0]["issue"], third[0]["issue_detail"], third[0]["sha256"]) == ("http_404", "HTTP 404", None)
    assert third == _fresh_urls(tmp_path, spec)
    # No url_downloads table at all: every record not_downloaded.
    with connect(spec.db_path) as con:
        con.execute("DROP TABLE url_downloads")
    out, fourth = _build(spec)
    assert _counts(out) == (2, 0, 0) and {r["issue"] for r in fourth} == {"not_downloaded"}


def _fresh_urls(tmp_path: Path, spec):
    """A scan from nothing with the same catalog and store (a URL record's location is in the
    work dir's store): the scan cache removed, then a build."""
    shutil.rmtree(Path(spec.work_dir) / "scan")
    out, rows = _build(spec)
    assert out.units_reused == 0
    return rows


def test_downloads_digest_is_the_same_in_python_and_sql(tmp_path):
    rows = [{"image_id": "a", "url": "http://h/ä", "status": "ok", "detail": None, "sha256": "ab" * 32},
            {"image_id": "b", "url": "", "status": "http_404", "detail": "HTTP 404 — not found", "sha256": None}]
    frag = tmp_path / "f.parquet"
    pq.write_table(pa.table({"image_id": ["a", "b", "a", "zz"], "issue": [None, None, "duplicate_id", "missing_id"]}),
                   frag)
    con = duckdb.connect()
    con.register("dl", pa.Table.from_pylist([{"source": "s", **r} for r in rows]))
    con.execute("CREATE TABLE url_downloads AS SELECT * FROM dl")
    (got,) = con.execute(DOWNLOADS_DIGEST_SQL, {"files": [str(frag)], "source": "s"}).fetchall()
    assert got[0] == str(frag) and list(got[1:]) == downloads_digest(rows)


def test_scan_part_runs_without_duckdb_from_a_json_message(tmp_path):
    """What a Celery worker does: decode the JSON item, scan, write the fragment; DuckDB is not
    importable there."""
    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    src = spec.sources[0]
    unit = str(raw / "tars" / "00002.tar")
    from bucket_assets.core.sources import webdataset

    task = ScanTask(source=src.model_dump(mode="json"), unit=unit, fingerprint=webdataset.fingerprint(src, unit),
                    start=0, stop=None,
                    max_chars=100, max_pixels=10**8, fragment=str(tmp_path / "frag" / "x.parquet"))
    payload = json.dumps([dataclasses.asdict(task)])
    code = ("import json, sys; sys.modules['duckdb'] = None\n"
            "from bucket_assets.distributed import run_chunk\n"
            f"print(json.dumps(run_chunk('scan', json.loads({payload!r}))))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    (summary,) = json.loads(res.stdout)
    assert summary["rows"] == 4 and summary["stable"] and summary["error"] is None
    table = pq.read_table(tmp_path / "frag" / "x.parquet")
    assert table.schema.equals(FRAGMENT_SCHEMA) and table.num_rows == 4
    assert json.loads(Path(summary_path(task.fragment)).read_text())["rows"] == 4
    # In process, the same task gives the same fragment rows.
    again = scan_part(dataclasses.replace(task, fragment=str(tmp_path / "frag" / "y.parquet")))
    assert again["rows"] == 4 and pq.read_table(tmp_path / "frag" / "y.parquet") == table


def test_a_source_that_cannot_be_read_fails_in_one_line(tmp_path):
    raw = _sources(tmp_path)
    pq.write_table(pa.table({"name": ["x"]}), raw / "meta.parquet")  # no id column
    spec = _spec(tmp_path, raw)
    from bucket_assets.core.sources.parquet import SourceError

    with pytest.raises(SourceError, match=r"^source pcb: parquet has no column 'id' \(columns.id\) in /.*/meta\.parquet$"):
        _build(spec)
    # The parts scanned before it were committed: fixing the parquet does not rescan the tars
    # (the folder, after it in spec order, was not reached by this in-process scan).
    pq.write_table(pa.table({"id": ["p0"], "caption": ["a"]}), raw / "meta.parquet")
    out, rows = _build(spec)
    assert _counts(out) == (3, 3, 0) and len(rows) == 12 + 1 + 6


def test_raw_index_asset_reports_units(tmp_path):
    import dagster as dg
    import yaml

    from bucket_assets.defs.assets.downloads import url_downloads
    from bucket_assets.defs.assets.ingest import raw_index
    from bucket_assets.defs.resources import ComputeResource, DatasetResource

    raw = _sources(tmp_path)
    spec = _spec(tmp_path, raw)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    resources = {"dataset": DatasetResource(spec_path=str(path)), "compute": ComputeResource()}
    for expect in ((6, 0, 0), (0, 6, 0)):
        res = dg.materialize([url_downloads, raw_index], resources=resources)
        md = res.asset_materializations_for_node("raw_index")[0].metadata
        got = tuple(md[k].value for k in ("units_scanned", "units_reused", "units_removed"))
        assert got == expect and all(isinstance(v, int) for v in got)
        assert md["dagster/row_count"].value == 24
