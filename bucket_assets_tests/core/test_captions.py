"""Captions: cleaning, landing caption-source files, and the waterfall SQL on in-memory DuckDB."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bucket_assets.core.captions import (
    REQUIRED_META,
    CaptionSourceError,
    LandingSource,
    as_float,
    caption_source_rows,
    clean_caption,
    discover_landing,
    landing_fingerprint,
    read_landing_captions,
    read_landing_meta,
    select_captions_sql,
)

# clean_caption ----------------------------------------------------------------------------------


def test_clean_caption_plain_text_trimmed_no_flags():
    assert clean_caption("  a cat on a mat \n", 100) == ("a cat on a mat", [])
    assert clean_caption("a cat".encode("utf-8"), 100) == ("a cat", [])
    assert clean_caption("café ☕".encode("utf-8"), 100) == ("café ☕", [])


def test_clean_caption_none():
    assert clean_caption(None, 100) == (None, [])


def test_clean_caption_non_utf8_bytes_replaced_and_flagged():
    text, flags = clean_caption(b"caf\xe9 au lait", 100)
    assert text == "caf\ufffd au lait"
    assert flags == ["caption_not_utf8"]


def test_clean_caption_nul_removed_and_flagged():
    assert clean_caption("a\x00b\x00", 100) == ("ab", ["caption_nul_removed"])
    text, flags = clean_caption(b"\xff\x00x", 100)
    assert text == "\ufffdx"
    assert flags == ["caption_not_utf8", "caption_nul_removed"]


@pytest.mark.parametrize("raw", ["", "   ", " \t\n\r ", b"  \n", "\x00 \x00"])
def test_clean_caption_whitespace_only_is_empty(raw):
    text, _ = clean_caption(raw, 100)
    assert text == ""


def test_clean_caption_long_text_capped_and_flagged():
    text, flags = clean_caption("x" * 50, 10)
    assert text == "x" * 10 and flags == ["caption_truncated"]
    # trailing whitespace at the cut is removed too
    text, flags = clean_caption("abcd   efgh", 6)
    assert text == "abcd" and flags == ["caption_truncated"]
    # exactly max_chars after trimming is not truncated
    assert clean_caption("  abcdef  ", 6) == ("abcdef", [])


def test_as_float():
    assert as_float(None) == (None, False)
    assert as_float(0.25) == (0.25, False)
    assert as_float("0.5") == (0.5, False)
    assert as_float(3) == (3.0, False)
    for bad in ("abc", float("nan"), float("inf"), True, [1]):
        assert as_float(bad) == (None, True), bad


# The waterfall ------------------------------------------------------------------------------------


@pytest.fixture
def con():
    c = duckdb.connect(":memory:")
    c.execute(
        """CREATE TABLE caption_sources (source_id INTEGER, name VARCHAR, kind VARCHAR, variant VARCHAR,
                                        created_at BIGINT)"""
    )
    c.execute(
        """CREATE TABLE captions (image_id VARCHAR, source_id INTEGER, variant VARCHAR, text VARCHAR,
                                  status VARCHAR, flags VARCHAR)"""
    )
    c.execute("CREATE TABLE _wanted (image_id VARCHAR)")
    c.execute("CREATE TEMP VIEW wanted_images AS SELECT image_id FROM _wanted")
    yield c
    c.close()


def _setup(con, sources, captions, wanted):
    con.executemany("INSERT INTO caption_sources VALUES (?, ?, ?, ?, ?)", sources)
    con.executemany("INSERT INTO captions VALUES (?, ?, ?, ?, ?, NULL)", captions)
    con.executemany("INSERT INTO _wanted VALUES (?)", [[w] for w in wanted])


def _select(con, selectors, missing="empty") -> dict[str, tuple]:
    rows = con.execute(select_captions_sql(), {"selectors": selectors, "missing": missing}).fetchall()
    cols = [d[0] for d in con.description]
    assert cols == ["image_id", "text", "caption_variant", "caption_selector_index", "caption_source_id", "status"]
    out = {r[0]: r[1:] for r in rows}
    assert len(out) == len(rows), "one row per wanted image"
    return out


SOURCES = [
    # source_id, name, kind, variant, created_at
    (1, "laion", "input", "alt_text", 0),
    (2, "gem_old", "landing", "gemini", 100),
    (3, "gem_new", "landing", "gemini", 200),
    (4, "mistral", "landing", "mistral", 300),
]


def test_waterfall_first_selector_wins(con):
    _setup(
        con,
        SOURCES,
        [
            ("a", 1, "alt_text", "alt a", "ok"),
            ("a", 4, "mistral", "mistral a", "ok"),
            ("a", 2, "gemini", "gemini a", "ok"),
            ("b", 1, "alt_text", "alt b", "ok"),
            ("b", 4, "mistral", "mistral b", "ok"),
            ("c", 1, "alt_text", "alt c", "ok"),
        ],
        ["a", "b", "c"],
    )
    got = _select(con, ["gemini", "mistral", "alt_text"])
    assert got["a"] == ("gemini a", "gemini", 0, 2, "selected")
    assert got["b"] == ("mistral b", "mistral", 1, 4, "selected")
    assert got["c"] == ("alt c", "alt_text", 2, 1, "selected")
    # another order of selectors changes the winner and the reported index
    got = _select(con, ["alt_text", "gemini"])
    assert got["a"] == ("alt a", "alt_text", 0, 1, "selected")
    assert got["b"] == ("alt b", "alt_text", 0, 1, "selected")


def test_waterfall_newer_source_wins_within_selector(con):
    _setup(
        con,
        SOURCES,
        [
            ("a", 2, "gemini", "old", "ok"),
            ("a", 3, "gemini", "new", "ok"),
            ("b", 3, "gemini", "new b", "ok"),
            ("b", 2, "gemini", "old b", "ok"),
        ],
        ["a", "b"],
    )
    got = _select(con, ["gemini"])
    assert got["a"] == ("new", "gemini", 0, 3, "selected")
    assert got["b"] == ("new b", "gemini", 0, 3, "selected")


def test_waterfall_same_created_at_prefers_higher_source_id(con):
    _setup(
        con,
        [(1, "x", "landing", "v", 50), (2, "y", "landing", "v", 50)],
        [("a", 1, "v", "from 1", "ok"), ("a", 2, "v", "from 2", "ok")],
        ["a"],
    )
    assert _select(con, ["v"])["a"] == ("from 2", "v", 0, 2, "selected")


def test_waterfall_skips_not_ok_and_empty(con):
    _setup(
        con,
        SOURCES,
        [
            ("a", 3, "gemini", "refused", "error"),  # newer but not ok
            ("a", 2, "gemini", "older ok", "ok"),
            ("b", 3, "gemini", "", "ok"),  # empty
            ("b", 2, "gemini", "   ", "ok"),  # whitespace only
            ("b", 4, "mistral", "mistral b", "ok"),
            ("c", 3, "gemini", None, "ok"),  # NULL text
            ("c", 4, "mistral", "x", "empty"),
            ("c", 1, "alt_text", "alt c", "ok"),
        ],
        ["a", "b", "c"],
    )
    got = _select(con, ["gemini", "mistral", "alt_text"])
    assert got["a"] == ("older ok", "gemini", 0, 2, "selected")
    assert got["b"] == ("mistral b", "mistral", 1, 4, "selected")
    assert got["c"] == ("alt c", "alt_text", 2, 1, "selected")


def test_waterfall_ignores_unselected_variants(con):
    _setup(con, SOURCES, [("a", 4, "mistral", "m", "ok")], ["a"])
    assert _select(con, ["gemini", "alt_text"])["a"] == ("", None, None, None, "empty")


@pytest.mark.parametrize("missing, status", [("empty", "empty"), ("drop", "dropped")])
def test_waterfall_missing_caption_policy(con, missing, status):
    _setup(
        con,
        SOURCES,
        [("a", 2, "gemini", "gemini a", "ok"), ("b", 2, "gemini", "bad", "error")],
        ["a", "b", "nothing"],
    )
    got = _select(con, ["gemini"], missing)
    assert got["a"] == ("gemini a", "gemini", 0, 2, "selected")
    assert got["b"] == ("", None, None, None, status)
    assert got["nothing"] == ("", None, None, None, status)


def test_waterfall_only_wanted_images(con):
    _setup(
        con,
        SOURCES,
        [("a", 2, "gemini", "ga", "ok"), ("z", 2, "gemini", "gz", "ok")],
        ["a"],
    )
    got = _select(con, ["gemini"])
    assert set(got) == {"a"}


# caption_source_rows --------------------------------------------------------------------------------


def _landing(name: str, variant: str, created_at: int) -> LandingSource:
    return LandingSource(
        name=name, variant=variant, backend="openrouter", model=f"m/{name}", created_at=created_at,
        system_prompt_sha256="s" * 64, user_prompt_sha256="u" * 64, parquet_path=f"/x/{name}.parquet",
        fingerprint="f" * 64,
    )


def test_caption_source_rows_ids_and_order():
    inputs = [("zeta", "folder", "sidecar"), ("alpha", "parquet", "caption")]
    landing = [_landing("newest", "gemini", 300), _landing("old", "gemini", 100), _landing("mid", "mistral", 200)]
    rows = caption_source_rows(inputs, landing)
    assert [(r["source_id"], r["name"], r["kind"]) for r in rows] == [
        (1, "alpha", "input"),
        (2, "zeta", "input"),
        (3, "old", "landing"),
        (4, "mid", "landing"),
        (5, "newest", "landing"),
    ]
    alpha = rows[0]
    assert alpha["variant"] == "caption" and alpha["backend"] == "source" and alpha["model"] == "parquet:alpha"
    assert alpha["created_at"] == 0 and alpha["file"] is None
    newest = rows[-1]
    assert newest["file"] == "newest.parquet" and newest["model"] == "m/newest" and newest["created_at"] == 300


def test_caption_source_rows_newer_landing_takes_next_id():
    inputs = [("src", "folder", "sidecar")]
    before = caption_source_rows(inputs, [_landing("a", "v", 100)])
    after = caption_source_rows(inputs, [_landing("b", "v", 200), _landing("a", "v", 100)])
    ids_before = {r["name"]: r["source_id"] for r in before}
    ids_after = {r["name"]: r["source_id"] for r in after}
    assert ids_after["src"] == ids_before["src"] == 1
    assert ids_after["a"] == ids_before["a"] == 2
    assert ids_after["b"] == 3


def test_caption_source_rows_landing_at_epoch_zero_after_inputs():
    rows = caption_source_rows([("zz", "folder", "sidecar")], [_landing("aa", "v", 0)])
    assert [r["name"] for r in rows] == ["zz", "aa"]


# landing files -------------------------------------------------------------------------------------------


def _meta(**overrides) -> dict:
    m = {
        "variant": "caption_gemini",
        "backend": "openrouter",
        "model": "google/gemini",
        "created_at": 1776589694,
        "system_prompt_sha256": "a" * 64,
        "user_prompt_sha256": "b" * 64,
    }
    m.update(overrides)
    return m


def _write_landing(d: Path, name: str, meta, table: pa.Table | None = None) -> tuple[Path, Path]:
    parquet = d / f"{name}.parquet"
    if table is None:
        table = pa.table({"image_id": ["a", "b"], "caption": ["cap a", "cap b"]})
    pq.write_table(table, parquet)
    meta_path = d / f"{name}.json"
    meta_path.write_text(meta if isinstance(meta, str) else json.dumps(meta), encoding="utf-8")
    return parquet, meta_path


def test_read_landing_meta_valid(tmp_path):
    parquet, meta = _write_landing(tmp_path, "gem", _meta())
    src = read_landing_meta("gem", parquet, meta)
    assert src.name == "gem" and src.variant == "caption_gemini" and src.created_at == 1776589694
    assert src.backend == "openrouter" and src.model == "google/gemini"
    assert src.parquet_path == str(parquet)
    assert src.fingerprint == landing_fingerprint(parquet, meta)
    meta.write_text(meta.read_text().replace("google/gemini", "google/gemini-2"))
    assert read_landing_meta("gem", parquet, meta).fingerprint != src.fingerprint


@pytest.mark.parametrize("field", REQUIRED_META)
def test_read_landing_meta_missing_field(tmp_path, field):
    m = _meta()
    del m[field]
    parquet, meta = _write_landing(tmp_path, "gem", m)
    with pytest.raises(CaptionSourceError) as ei:
        read_landing_meta("gem", parquet, meta)
    msg = str(ei.value)
    assert "gem" in msg and "missing" in msg and field in msg


@pytest.mark.parametrize("content", [json.dumps(["a", "b"]), json.dumps("text"), json.dumps(3)])
def test_read_landing_meta_not_an_object(tmp_path, content):
    parquet, meta = _write_landing(tmp_path, "gem", content)
    with pytest.raises(CaptionSourceError, match="JSON object"):
        read_landing_meta("gem", parquet, meta)


def test_read_landing_meta_invalid_json(tmp_path):
    parquet, meta = _write_landing(tmp_path, "gem", "{not json")
    with pytest.raises(CaptionSourceError, match="not valid JSON"):
        read_landing_meta("gem", parquet, meta)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"variant": "has space"}, "variant"),
        ({"variant": 5}, "variant"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": True}, "created_at"),
        ({"model": 7}, "model"),
        ({"backend": None}, "backend"),
    ],
)
def test_read_landing_meta_bad_values(tmp_path, overrides, needle):
    parquet, meta = _write_landing(tmp_path, "gem", _meta(**overrides))
    with pytest.raises(CaptionSourceError, match=needle):
        read_landing_meta("gem", parquet, meta)


def test_read_landing_captions_cleans_and_defaults_status(tmp_path):
    table = pa.table(
        {
            "image_id": ["a", None, "c", "d"],
            "caption": ["  cap a ", "lost", "x\x00y", None],
        }
    )
    parquet, meta = _write_landing(tmp_path, "gem", _meta(), table)
    out = read_landing_captions(read_landing_meta("gem", parquet, meta), max_chars=100)
    assert out.column_names == ["image_id", "text", "status", "flags"]
    assert out.to_pylist() == [
        {"image_id": "a", "text": "cap a", "status": "ok", "flags": None},
        {"image_id": "c", "text": "xy", "status": "ok", "flags": "caption_nul_removed"},
        {"image_id": "d", "text": None, "status": "ok", "flags": None},
    ]


def test_read_landing_captions_status_column_and_integer_ids(tmp_path):
    table = pa.table({"image_id": [1, 2], "caption": ["one", "two"], "status": ["ok", "refused"]})
    parquet, meta = _write_landing(tmp_path, "gem", _meta(), table)
    out = read_landing_captions(read_landing_meta("gem", parquet, meta), max_chars=2)
    assert out.column("image_id").to_pylist() == ["1", "2"]
    assert out.column("status").to_pylist() == ["ok", "refused"]
    assert out.column("text").to_pylist() == ["on", "tw"]
    assert out.column("flags").to_pylist() == ["caption_truncated", "caption_truncated"]


def test_read_landing_captions_missing_caption_column(tmp_path):
    table = pa.table({"image_id": ["a"], "text": ["cap"]})
    parquet, meta = _write_landing(tmp_path, "gem", _meta(), table)
    src = read_landing_meta("gem", parquet, meta)
    with pytest.raises(CaptionSourceError, match="missing column 'caption'"):
        read_landing_captions(src, 100)


def test_read_landing_captions_wrong_types(tmp_path):
    table = pa.table({"image_id": [1.5], "caption": ["c"]})
    parquet, meta = _write_landing(tmp_path, "gem", _meta(), table)
    with pytest.raises(CaptionSourceError, match="image_id"):
        read_landing_captions(read_landing_meta("gem", parquet, meta), 100)
    table = pa.table({"image_id": ["a"], "caption": [3]})
    parquet, meta = _write_landing(tmp_path, "gem2", _meta(), table)
    with pytest.raises(CaptionSourceError, match="caption"):
        read_landing_captions(read_landing_meta("gem2", parquet, meta), 100)


def test_read_landing_captions_unreadable_parquet(tmp_path):
    parquet, meta = _write_landing(tmp_path, "gem", _meta())
    src = read_landing_meta("gem", parquet, meta)
    parquet.write_bytes(b"not a parquet file")
    with pytest.raises(CaptionSourceError, match="cannot read parquet"):
        read_landing_captions(src, 100)


def test_discover_landing_pairs_only(tmp_path):
    _write_landing(tmp_path, "b", _meta())
    _write_landing(tmp_path, "a", _meta())
    pq.write_table(pa.table({"image_id": ["x"], "caption": ["y"]}), tmp_path / "incomplete.parquet")
    (tmp_path / "orphan.json").write_text("{}", encoding="utf-8")
    found = discover_landing(tmp_path)
    assert [n for n, _, _ in found] == ["a", "b"]
    assert found[0][1] == tmp_path / "a.parquet" and found[0][2] == tmp_path / "a.json"
    assert discover_landing(tmp_path / "absent") == []


# build_caption_table ------------------------------------------------------------------------------


def test_caption_table_first_row_of_a_duplicated_id_wins(tmp_path):
    """One caption per (source, image id): the lowest row_id of an input source and the first
    file row of a landing source win, with their own status and flags, whatever the table order;
    the same id in another source keeps that source's caption; unknown ids count every row."""
    from bucket_assets.core.captions import build_caption_table

    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE raw_index (row_id BIGINT, image_id VARCHAR, source VARCHAR, caption VARCHAR, notes VARCHAR)")
    con.executemany(
        "INSERT INTO raw_index VALUES (?, ?, ?, ?, ?)",
        [
            (2, "a", "web", "web a second", "late"),  # stored before the first row of its id
            (0, "a", "web", "web a first", None),
            (1, "b", "web", "web b", "n1"),
            (3, "a", "hub", "hub a", None),  # the same id in another source
            (6, "d", "hub", "hub d later", None),
            (5, "d", "hub", None, "first, without caption"),
            (4, "c", "hub", "", None),
        ],
    )
    table = pa.table(
        {
            "image_id": ["x", "a", "x", "a", "y", "zz", "y"],
            "caption": ["x first", "a\x00one", "x second", "a two", "y1", None, "y2"],
            "status": ["error", "ok", "ok", "ok", None, "ok", "ok"],
        }
    )
    parquet, meta = _write_landing(tmp_path, "gem", _meta(), table)
    src = read_landing_meta("gem", parquet, meta)
    rows, unknown = build_caption_table(con, [("web", "webdataset", "alt_text"), ("hub", "parquet", "alt_text")], [src], 100)
    assert [(r["source_id"], r["name"]) for r in rows] == [(1, "hub"), (2, "web"), (3, "gem")]
    got = con.execute("SELECT source_id, image_id, variant, text, status, flags FROM captions ORDER BY source_id, image_id").fetchall()
    assert got == [
        (1, "a", "alt_text", "hub a", "ok", None),
        (1, "c", "alt_text", "", "empty", None),
        (1, "d", "alt_text", None, "empty", "first, without caption"),
        (2, "a", "alt_text", "web a first", "ok", None),
        (2, "b", "alt_text", "web b", "ok", "n1"),
        (3, "a", "caption_gemini", "aone", "ok", "caption_nul_removed"),
        (3, "x", "caption_gemini", "x first", "error", None),
        (3, "y", "caption_gemini", "y1", "no_status", None),
        (3, "zz", "caption_gemini", None, "ok", None),
    ]
    assert unknown == {"gem": 5}  # x, x, y, zz, y: every row whose id is in no source
