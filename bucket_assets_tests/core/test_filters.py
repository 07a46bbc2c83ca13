"""filters.columns (issue 14): rules on any numeric column of the source's own metadata; the first
rule a record fails is its reason `column_filter` (detail: column, value, bound); records without
a numeric value there pass."""

from __future__ import annotations

import json

import duckdb
import pytest

from bucket_assets.core.buckets import bucket_table
from bucket_assets.core.filters import apply_filters
from bucket_assets.spec import Filters, SpecError, parse_spec

META = [
    {"aesthetic": 6.1, "pwatermark": 0.9},
    {"aesthetic": 4.2},
    {"other": 1},
    None,
    {"aesthetic": "nan"},
    {"aesthetic": "7", "pwatermark": 0.2},
    {"aesthetic": 1e400},  # parsed as infinity by DuckDB's JSON: not a usable value
    {"aesthetic": [5], "a.b/c~d": 3.0},
    {"aesthetic": 5.0, "pwatermark": 0.5},  # both bounds are inclusive
    {"aesthetic": True},
]


def _decide(rules: list[dict], meta=META, nsfw=None) -> list[tuple]:
    con = duckdb.connect()
    con.execute(
        """CREATE TABLE raw_index (row_id BIGINT, image_id VARCHAR, source VARCHAR, issue VARCHAR, issue_detail VARCHAR,
           sha256 VARCHAR, width INTEGER, height INTEGER, nsfw VARCHAR, similarity DOUBLE, source_meta VARCHAR)"""
    )
    for i, m in enumerate(meta):
        con.execute("INSERT INTO raw_index VALUES (?, ?, 's', NULL, NULL, ?, 512, 512, ?, NULL, ?)",
                    [i, f"id{i}", f"h{i}", (nsfw or {}).get(i), None if m is None else json.dumps(m)])
    apply_filters(con, Filters(min_similarity=None, columns=rules), bucket_table([512], 32))
    return con.execute("SELECT decision, detail FROM filtered_images ORDER BY row_id").fetchall()


def test_min_and_max_rules_in_order_name_the_first_failed():
    got = _decide([{"column": "aesthetic", "min": 5.0}, {"column": "pwatermark", "max": 0.5}])
    assert got == [
        ("column_filter", "pwatermark 0.9 > max 0.5"),
        ("column_filter", "aesthetic 4.2 < min 5.0"),
        ("keep", None),  # no such column: passes
        ("keep", None),  # no metadata at all
        ("keep", None),  # NaN is not a value
        ("keep", None),  # "7" is a number written as text: 7 >= 5
        ("keep", None),  # infinity is not a value
        ("keep", None),  # a list is not a number
        ("keep", None),  # bounds are inclusive
        ("keep", None),  # a boolean is not a number
    ]


def test_both_bounds_and_any_key_spelling():
    got = _decide([{"column": "a.b/c~d", "min": 0, "max": 2.5}])
    assert got[7] == ("column_filter", "a.b/c~d 3.0 > max 2.5")
    assert {d for d, _ in got[:7]} == {"keep"}


def test_other_reasons_come_first():
    got = _decide([{"column": "aesthetic", "min": 5.0}], nsfw={1: "NSFW"})
    assert got[1][0] == "nsfw"


def test_no_rules_changes_nothing():
    assert {d for d, _ in _decide([])} == {"keep"}


@pytest.mark.parametrize(
    "rule,words",
    [
        ({"column": "aesthetic"}, "needs min, max or both"),
        ({"column": "aesthetic", "min": 6, "max": 5}, "min 6.0 is above max 5.0"),
        ({"column": "", "min": 1}, "at least 1 character"),
        ({"column": "a\nb", "min": 1}, "control characters"),
        ({"column": "a", "min": ".nan"}, "finite"),
        ({"column": "a", "min": 1, "bogus": 2}, "unknown key"),
    ],
)
def test_bad_rules_are_spec_errors_naming_the_key(tmp_path, rule, words):
    (tmp_path / "raw").mkdir()
    data = {"name": "x", "output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "sources": [{"name": "f", "kind": "folder", "path": str(tmp_path / "raw")}],
            "filters": {"columns": [rule]}}
    if rule.get("min") == ".nan":
        data["filters"]["columns"][0]["min"] = float("nan")
    with pytest.raises(SpecError) as exc:
        parse_spec(data, tmp_path)
    msg = str(exc.value)
    assert "filters.columns" in msg and words in msg and "\n" not in msg, msg
