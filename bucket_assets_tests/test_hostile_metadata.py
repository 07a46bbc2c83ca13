"""Hostile captions and metadata end to end: each value is repaired and flagged or the record
gets a recorded reason; a malformed source fails with an error naming the column."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from bucket_assets.core.accounting import OUTCOMES_SQL
from bucket_assets.core.manifest import verify_export
from bucket_assets.core.shards import read_shard
from bucket_assets.core.sources import ScanStats
from bucket_assets.core.sources.parquet import SourceError, scan
from bucket_assets.spec import load_spec, parse_spec
from bucket_assets_tests.conftest import materialize_all, run_cli

MAX_CHARS = 1000


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples.items():
            for ext, data in parts.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _landing(d: Path, name: str, table: pa.Table) -> None:
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / f"{name}.parquet")
    (d / f"{name}.json").write_text(json.dumps({
        "variant": "caption_llm", "backend": "openrouter", "model": "some/model", "created_at": 1776589694,
        "system_prompt_sha256": "a" * 64, "user_prompt_sha256": "b" * 64,
    }))


def test_hostile_captions_and_metadata(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    meta = lambda **kw: json.dumps({"url": "http://x", "similarity": 0.5, **kw}).encode()  # noqa: E731
    _tar(raw / "00000.tar", {
        "latin1": {"jpg": _jpeg(1), "txt": "café au lait".encode("latin-1"), "json": meta()},
        "nul": {"jpg": _jpeg(2), "txt": b"a\x00b caption", "json": meta()},
        "huge": {"jpg": _jpeg(3), "txt": b"word " * 20_000, "json": meta()},  # 100 kB
        "blank": {"jpg": _jpeg(4), "txt": b" \n\t  ", "json": meta()},
        "listjson": {"jpg": _jpeg(5), "txt": b"list json", "json": b"[1, 2]"},
        "nan": {"jpg": _jpeg(6), "txt": b"nan similarity", "json": b'{"similarity": NaN}'},
        "strsim": {"jpg": _jpeg(7), "txt": b"string similarity", "json": meta(similarity="high")},
        "low": {"jpg": _jpeg(8), "txt": b"low similarity", "json": meta(similarity=0.1)},
    })
    # A parquet source whose ids are integers; a landing source names the same images by strings.
    (raw / "pcb").mkdir()
    for i in (7, 8):
        (raw / "pcb" / f"{i}.jpg").write_bytes(_jpeg(100 + i))
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.int64()), "caption": ["seven", None],
                             "tags": [["t1", "t2"], ["red", "car"]]}), raw / "pcb" / "meta.parquet")
    _landing(tmp_path / "captions", "llm", pa.table({"image_id": ["7", "latin1"], "caption": ["landing seven", "landing\x00 latin1"]}))

    spec = {
        "name": "meta", "output_dir": str(tmp_path / "out" / "export"), "work_dir": str(tmp_path / "out" / "work"),
        "sources": [
            {"name": "laion", "kind": "webdataset", "paths": [str(raw / "*.tar")]},
            {"name": "pcb", "kind": "parquet", "path": str(raw / "pcb" / "meta.parquet"), "image_dir": str(raw / "pcb"),
             "columns": {"id": "id", "caption": "caption", "fallback_caption": "tags"}},
        ],
        "filters": {"drop_duplicates": False, "drop_blank": False, "min_similarity": 0.3},
        "captions": {"landing_dir": str(tmp_path / "captions"), "selectors": ["caption_llm", "alt_text", "caption"],
                     "missing": "drop", "max_chars": MAX_CHARS},
        "image": {"workers": 1},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert materialize_all(spec_path).success
    s = load_spec(spec_path)

    con = duckdb.connect(str(s.db_path), read_only=True)
    con.execute(OUTCOMES_SQL)
    outcomes = dict(con.execute("SELECT image_id, outcome FROM image_outcomes").fetchall())
    notes = dict(con.execute("SELECT image_id, notes FROM raw_index WHERE notes IS NOT NULL").fetchall())
    con.close()
    assert outcomes == {
        "latin1": "exported", "nul": "exported", "huge": "exported", "blank": "no_caption", "listjson": "exported",
        "nan": "exported", "strsim": "exported", "low": "low_similarity", "7": "exported", "8": "exported",
    }
    assert notes == {
        "latin1": "caption_not_utf8", "nul": "caption_nul_removed", "huge": "caption_truncated",
        "listjson": "json_not_object", "nan": "invalid_similarity", "strsim": "invalid_similarity",
    }

    export = Path(s.output_dir)
    verify_export(export)
    texts, metas = {}, {}
    for shard in sorted(export.rglob("shard-*.tar")):
        for key, parts in read_shard(shard):
            m = json.loads(parts["json"])
            texts[m["image_id"]] = parts["txt"].decode("utf-8").removesuffix("\n")
            metas[m["image_id"]] = m
    assert texts["latin1"] == "landing latin1"  # the landing caption wins, its NUL removed
    assert texts["nul"] == "ab caption"
    assert texts["huge"] == ("word " * 200)[:MAX_CHARS].rstrip()  # capped at max_chars, then trimmed
    assert texts["7"] == "landing seven"  # int id in the source, string id in the landing file
    assert texts["8"] == "red, car"  # null caption: the fallback column (a list of tags)
    assert metas["nan"]["similarity"] is None and metas["strsim"]["similarity"] is None
    # Every json field has one type across samples (schema inference in readers holds).
    for field in metas["7"]:
        assert len({type(m[field]).__name__ for m in metas.values()} - {"NoneType"}) <= 1, field

    manifest = json.loads((export / "manifest.json").read_text())
    summ = manifest["summary"]
    assert summ["images_seen"] == 10 and summ["images_exported"] == 8
    assert summ["skipped_no_caption"] == 1 and summ["skipped_low_similarity"] == 1
    assert summ["flags"] == {"caption_not_utf8": 1, "caption_nul_removed": 2, "caption_truncated": 1,
                             "invalid_similarity": 2, "json_not_object": 1}
    assert "caption_not_utf8 1" in (export / "README.md").read_text()


def _parquet_source(tmp_path: Path, table: pa.Table, **columns):
    (tmp_path / "img").mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "m.parquet")
    data = {"name": "d", "output_dir": "o", "work_dir": "w", "sources": [
        {"name": "pcb", "kind": "parquet", "path": str(tmp_path / "m.parquet"), "image_dir": str(tmp_path / "img"),
         "columns": {"id": "id", "caption": "caption", **columns}}]}
    return parse_spec(data, tmp_path).sources[0]


@pytest.mark.parametrize("table, columns, needle", [
    (pa.table({"id": ["a"]}), {}, "parquet has no column 'caption' (columns.caption) in {path}"),
    (pa.table({"id": ["a"], "caption": ["c"]}), {"width": "w", "height": "h"}, "parquet has no column 'w' (columns.width) in {path}"),
    (pa.table({"id": [1.5], "caption": ["c"]}), {}, "column 'id' (columns.id) must be string or integer, got double"),
    (pa.table({"id": ["a"], "caption": ["c"], "w": ["wide"], "h": [3]}), {"width": "w", "height": "h"},
     "column 'w' (columns.width) must be numeric, got string"),
])
def test_parquet_source_with_wrong_columns_names_the_column(tmp_path, table, columns, needle):
    source = _parquet_source(tmp_path, table, **columns)
    with pytest.raises(SourceError) as ei:
        list(scan(source, ScanStats(), 100))
    assert str(ei.value) == f"source pcb: {needle}".replace("{path}", source.path)


def test_build_with_a_missing_parquet_column_fails_in_one_line(tmp_path):
    inp = tmp_path / "in"
    (inp / "img").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "text": ["c"]}), inp / "m.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "d", "output_dir": str(tmp_path / "o"), "work_dir": str(tmp_path / "w"),
                                    "sources": [{"name": "pcb", "kind": "parquet", "path": str(inp / "m.parquet"),
                                                 "image_dir": str(inp / "img")}]}))
    res = run_cli("build", "--spec", str(spec), env={"DAGSTER_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert err.count("\n") == 0
    assert "build failed: raw_index: SourceError: source pcb: parquet has no column 'caption' (columns.caption)" in err, err
