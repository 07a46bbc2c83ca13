"""Filter decisions: exactly one per raw record, 'keep' or a reason.

Everything here is decided from the raw index (headers, hashes, source metadata) without
decoding pixels; 'blank' needs pixels and is decided where they are decoded anyway (the
processed-images stage), so it costs nothing extra.
"""

from __future__ import annotations

import duckdb

from bucket_assets.core.buckets import Bucket, fit_sql
from bucket_assets.core.db import rebuild_unless_current
from bucket_assets.spec import Filters

# Order matters: the first matching rule is the recorded reason. Content duplicates are found
# among records that pass every other rule, so a dropped first copy does not drop a good one.
FILTER_SQL = """
CREATE OR REPLACE TABLE filtered_images AS
WITH first_pass AS (
    SELECT row_id, image_id, source, sha256,
        CASE
            WHEN issue IS NOT NULL THEN issue
            WHEN row_number() OVER (PARTITION BY source, image_id ORDER BY row_id) > 1 THEN 'duplicate_id'
            WHEN nsfw IS NOT NULL AND list_contains($drop_nsfw, nsfw) THEN 'nsfw'
            WHEN $min_similarity IS NOT NULL AND similarity IS NOT NULL AND similarity < $min_similarity
                THEN 'low_similarity'
            {column_decisions}
            WHEN fit.too_small THEN 'too_small'
            ELSE 'keep'
        END AS decision,
        CASE
            WHEN issue IS NOT NULL THEN issue_detail
            WHEN nsfw IS NOT NULL AND list_contains($drop_nsfw, nsfw) THEN 'NSFW tag ' || nsfw
            WHEN $min_similarity IS NOT NULL AND similarity IS NOT NULL AND similarity < $min_similarity
                THEN 'similarity ' || similarity::VARCHAR
            {column_details}
            WHEN fit.too_small THEN fit.detail
        END AS detail
    FROM {raw} LEFT JOIN _fit AS fit USING (row_id)
),
dups AS (
    SELECT row_id,
           first_value(image_id) OVER w AS first_id,
           row_number() OVER w AS copy_rank
    FROM first_pass
    WHERE decision = 'keep' AND $drop_duplicates
    WINDOW w AS (PARTITION BY sha256 ORDER BY row_id)
)
SELECT f.row_id, f.image_id, f.source,
       CASE WHEN d.copy_rank > 1 THEN 'duplicate' ELSE f.decision END AS decision,
       CASE WHEN d.copy_rank > 1 THEN 'same bytes as ' || d.first_id ELSE f.detail END AS detail
FROM first_pass f LEFT JOIN dups d USING (row_id)
ORDER BY f.row_id
"""


def _column_sql(n: int) -> tuple[str, str, str]:
    """The SQL of n column rules (names and bounds are bound parameters): the values, one per
    rule, taken from the record's source metadata; a value that is absent, not a number, NaN or
    infinite does not count, so the record passes that rule."""
    values = ", ".join(
        f"TRY_CAST(json_extract_string(source_meta, $col_path_{i}) AS DOUBLE) AS _col_{i}"
        for i in range(n)
    )
    fails = [
        f"isfinite(_col_{i}) AND (_col_{i} < coalesce($col_min_{i}, _col_{i}) OR _col_{i} > coalesce($col_max_{i}, _col_{i}))"
        for i in range(n)
    ]
    decisions = "\n            ".join(f"WHEN {f} THEN 'column_filter'" for f in fails)
    details = "\n            ".join(
        f"WHEN {f} THEN $col_name_{i} || ' ' || _col_{i}::VARCHAR || "
        f"CASE WHEN _col_{i} < coalesce($col_min_{i}, _col_{i}) THEN ' < min ' || $col_min_{i}::VARCHAR "
        f"ELSE ' > max ' || $col_max_{i}::VARCHAR END"
        for i, f in enumerate(fails)
    )
    raw = f"(SELECT *, {values} FROM raw_index)" if n else "raw_index"
    return raw, decisions, details


def column_pointer(column: str) -> str:
    """A top-level key as a JSON pointer (any character allowed; ~ and / escaped)."""
    return "/" + column.replace("~", "~0").replace("/", "~1")


def apply_filters(con: duckdb.DuckDBPyConnection, filters: Filters, buckets: list[Bucket]) -> bool:
    """Create table filtered_images from raw_index: one decision per record. Kept as it is when
    raw_index, the rules and the buckets are those it was built from (core.db.rebuild_unless_current);
    returns whether it was built."""
    from bucket_assets.core.buckets import CHOICE_SQL, SCALE_EPS

    settings = {"filters": filters.model_dump(mode="json"), "buckets": [str(b) for b in buckets],
                "sql": [FILTER_SQL, CHOICE_SQL, SCALE_EPS, _column_sql(len(filters.columns))]}
    return rebuild_unless_current(con, "filtered_images", ["raw_index"], settings,
                                  lambda: _build(con, filters, buckets))


def _build(con: duckdb.DuckDBPyConnection, filters: Filters, buckets: list[Bucket]) -> None:
    fit_sql(
        con,
        "SELECT row_id AS image_id, width, height FROM raw_index WHERE issue IS NULL AND width > 0 AND height > 0",
        buckets,
        "_fit_by_id",
    )
    con.execute("CREATE OR REPLACE TEMP VIEW _fit AS SELECT image_id AS row_id, too_small, detail FROM _fit_by_id")
    try:
        _run_filter_sql(con, filters)
    finally:
        con.execute("DROP VIEW IF EXISTS _fit")
        con.execute("DROP TABLE IF EXISTS _fit_by_id")


def _run_filter_sql(con: duckdb.DuckDBPyConnection, filters: Filters) -> None:
    raw, decisions, details = _column_sql(len(filters.columns))
    params = {
        "drop_nsfw": list(filters.drop_nsfw),
        "min_similarity": filters.min_similarity,
        "drop_duplicates": filters.drop_duplicates,
    }
    for i, rule in enumerate(filters.columns):
        params.update({f"col_path_{i}": column_pointer(rule.column), f"col_name_{i}": rule.column,
                       f"col_min_{i}": rule.min, f"col_max_{i}": rule.max})
    con.execute(FILTER_SQL.format(raw=raw, column_decisions=decisions, column_details=details), params)
