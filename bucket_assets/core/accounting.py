"""Where every raw record ended: exported, or exactly one skip reason.

Invariant: images_seen == images_exported + sum(skips). An image counts as exported when it is
in at least one shard (multi-res exports may hold it in several buckets). 'not_built' means a
kept image whose bucket partition has not been materialized yet; a finished build has none.
"""

from __future__ import annotations

import duckdb

# Reasons that the seed card prints under their historical names.
SEED_NAMES = {"decode_error": "decode_errors", "encode_error": "encode_errors"}
ALWAYS_REPORTED = ("no_caption", "too_small", "decode_error", "encode_error")

OUTCOMES_SQL = """
CREATE OR REPLACE TEMP VIEW image_outcomes AS
WITH proc AS (
    SELECT image_id, bool_or(status = 'ok') AS any_ok,
           min(status) FILTER (WHERE status <> 'ok') AS first_error
    FROM processed_images GROUP BY image_id
),
exported AS (SELECT DISTINCT image_id FROM shard_samples)
SELECT f.row_id, f.image_id, f.source,
    CASE
        WHEN f.decision <> 'keep' THEN f.decision
        WHEN e.image_id IS NOT NULL THEN 'exported'
        WHEN sc.status = 'dropped' THEN 'no_caption'
        WHEN proc.first_error IS NOT NULL AND NOT proc.any_ok THEN proc.first_error
        ELSE 'not_built'
    END AS outcome
FROM filtered_images f
-- Plain equi-joins (a non-equality term in a LEFT JOIN makes DuckDB fall back to a nested loop);
-- rows that are not 'keep' are decided by the first WHEN whatever they join to.
LEFT JOIN exported e ON e.image_id = f.image_id
LEFT JOIN selected_captions sc ON sc.image_id = f.image_id
LEFT JOIN proc ON proc.image_id = f.image_id
"""


def outcome_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    con.execute(OUTCOMES_SQL)
    rows = con.execute("SELECT outcome, count(*) FROM image_outcomes GROUP BY outcome ORDER BY outcome").fetchall()
    return {k: int(v) for k, v in rows}


def summary(con: duckdb.DuckDBPyConnection, scan_skips: dict[str, int], file_skips: dict[str, int] | None = None) -> dict:
    """`scan_skips`: tar members that are not samples; `file_skips`: whole source files that
    could not be read (reason -> files)."""
    counts = outcome_counts(con)
    seen = sum(counts.values())
    samples = con.execute("SELECT count(*) FROM shard_samples").fetchone()[0]
    out: dict = {
        "images_seen": seen,
        "images_exported": counts.pop("exported", 0),
        "samples_exported": int(samples),
    }
    for reason in ALWAYS_REPORTED:
        counts.setdefault(reason, 0)
    # skipped_* first (sorted), then the seed card's error counters.
    for reason in sorted(counts, key=lambda r: (r in SEED_NAMES, r)):
        out[SEED_NAMES.get(reason, f"skipped_{reason}")] = counts[reason]
    out["tar_members_skipped"] = dict(sorted(scan_skips.items()))
    out["source_files_skipped"] = dict(sorted((file_skips or {}).items()))
    out["flags"] = flag_counts(con)
    return out


FLAGS_SQL = """
SELECT flag, count(*) FROM (
    SELECT unnest(string_split(notes, ',')) AS flag FROM raw_index WHERE notes IS NOT NULL
    UNION ALL
    SELECT unnest(string_split(c.flags, ',')) FROM captions c JOIN caption_sources s USING (source_id)
    WHERE s.kind = 'landing' AND c.flags IS NOT NULL
) WHERE flag <> '' GROUP BY flag ORDER BY flag
"""


def flag_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Non-fatal repairs, per flag: records whose caption or metadata was repaired or ignored
    (caption_not_utf8, caption_nul_removed, caption_truncated, invalid_similarity, ...) plus
    landing captions so repaired. The record itself is still counted under its outcome."""
    return {k: int(v) for k, v in con.execute(FLAGS_SQL).fetchall()}


def check_balance(s: dict) -> bool:
    skips = sum(v for k, v in s.items() if k.startswith("skipped_") or k in SEED_NAMES.values())
    return s["images_seen"] == s["images_exported"] + skips


def build_report(m: dict) -> list[str]:
    """What a finished build says on the console, from the manifest it published: images seen
    and exported, skips by reason, samples per caption source, rejected caption sources. The
    manifest's `warnings` are printed by the caller, after these lines."""
    s = m.get("summary") or {}
    buckets = m.get("buckets") or {}
    shards = sum(len(b.get("shards") or []) for b in buckets.values())
    lines = [
        f"images: {s.get('images_seen', 0):,} seen, {s.get('images_exported', 0):,} exported as "
        f"{s.get('samples_exported', 0):,} samples in {shards:,} shard(s) of {len(buckets)} bucket(s)"
    ]
    names = {v: k for k, v in SEED_NAMES.items()}
    skips = {
        (k.removeprefix("skipped_") if k.startswith("skipped_") else names[k]): v
        for k, v in s.items() if (k.startswith("skipped_") or k in names) and isinstance(v, int) and v
    }
    lines.append("skipped: " + (", ".join(f"{k} {v:,}" for k, v in sorted(skips.items())) or "none"))
    for key, what in (("source_files_skipped", "source files unreadable"), ("tar_members_skipped", "tar members not samples")):
        if s.get(key):
            lines.append(f"{what}: " + ", ".join(f"{k} {v:,}" for k, v in s[key].items()))
    used = s.get("caption_sources_used") or []
    if used:
        lines.append("captions: " + ", ".join(
            f"{u['name']} ({u['variant']}) {u['samples']:,}" if u.get("name") is not None else f"empty {u['samples']:,}"
            for u in used
        ))
    for r in m.get("caption_sources_rejected") or []:
        lines.append(f"rejected: {r['reason']}")
    return lines
