"""Captions: text cleaning, caption-source files in the landing directory, and the waterfall.

The waterfall runs as SQL over a DuckDB connection (no Dagster here), so the same code serves
a unit test on an in-memory database and a build over millions of rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

REQUIRED_META = ("variant", "backend", "model", "created_at", "system_prompt_sha256", "user_prompt_sha256")
_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


# Whitespace trimmed from captions: every character Python's str.isspace() accepts, so the
# Python path (source captions) and the SQL path (landing captions) trim exactly alike.
_WS = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


class CaptionSourceError(ValueError):
    """A landing caption source that cannot be used; the message says why."""


def clean_caption(raw: bytes | str | None, max_chars: int) -> tuple[str | None, list[str]]:
    """Normalise one caption: UTF-8 with replacement, no NULs, trimmed, capped. Returns flags."""
    flags: list[str] = []
    if raw is None:
        return None, flags
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            flags.append("caption_not_utf8")
    else:
        text = raw
    if "\x00" in text:
        text = text.replace("\x00", "")
        flags.append("caption_nul_removed")
    text = text.strip(_WS)
    if len(text) > max_chars:
        text = text[:max_chars].rstrip(_WS)
        flags.append("caption_truncated")
    return text, flags


def as_float(value: object) -> tuple[float | None, bool]:
    """A similarity-like number, or (None, invalid?) for strings, NaN, infinities and junk."""
    if value is None:
        return None, False
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, True
    if math.isnan(f) or math.isinf(f) or isinstance(value, bool):
        return None, True
    return f, False


@dataclass(frozen=True)
class LandingSource:
    name: str
    variant: str
    backend: str
    model: str
    created_at: int
    system_prompt_sha256: str
    user_prompt_sha256: str
    parquet_path: str
    fingerprint: str  # landing_fingerprint of the parquet + json pair


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def discover_landing(landing_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """Complete (name, parquet, json) pairs; a parquet without its json is not yet complete."""
    d = Path(landing_dir)
    if not d.is_dir():
        return []
    out = []
    for meta in sorted(d.glob("*.json")):
        parquet = meta.with_suffix(".parquet")
        if parquet.is_file():
            out.append((meta.stem, parquet, meta))
    return out


def read_landing_meta(name: str, parquet: Path, meta_path: Path) -> LandingSource:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionSourceError(f"caption source {name}: {meta_path.name} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CaptionSourceError(f"caption source {name}: {meta_path.name} must hold a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CaptionSourceError(f"caption source {name}: {meta_path.name} is missing {', '.join(missing)}")
    variant = meta["variant"]
    if not isinstance(variant, str) or not _VARIANT_RE.match(variant):
        raise CaptionSourceError(f"caption source {name}: variant {variant!r} is not a valid variant name")
    created = meta["created_at"]
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise CaptionSourceError(f"caption source {name}: created_at must be unix seconds, got {created!r}")
    for k in ("backend", "model", "system_prompt_sha256", "user_prompt_sha256"):
        if not isinstance(meta[k], str):
            raise CaptionSourceError(f"caption source {name}: {k} must be a string")
    return LandingSource(
        name=name,
        variant=variant,
        backend=meta["backend"],
        model=meta["model"],
        created_at=int(created),
        system_prompt_sha256=meta["system_prompt_sha256"],
        user_prompt_sha256=meta["user_prompt_sha256"],
        parquet_path=str(parquet),
        fingerprint=landing_fingerprint(parquet, meta_path),
    )


def landing_captions_sql(con, src: LandingSource) -> str:
    """SQL selecting (image_id, text, status, row_number, flags) from one landing parquet, cleaned like
    clean_caption (NULs removed, trimmed, capped at $max_chars, flagged). Parameters: $path,
    $max_chars. Raises CaptionSourceError for missing or mistyped columns and non-UTF-8 text."""
    try:
        cols = dict(
            (r[0], r[1]) for r in con.execute("DESCRIBE SELECT * FROM read_parquet($path)", {"path": src.parquet_path}).fetchall()
        )
    except Exception as exc:  # noqa: BLE001 - duckdb raises several error types for a bad file
        raise CaptionSourceError(f"caption source {src.name}: cannot read parquet ({exc})") from None
    for col in ("image_id", "caption"):
        if col not in cols:
            raise CaptionSourceError(f"caption source {src.name}: missing column {col!r}")
    if cols["image_id"] not in ("VARCHAR", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UBIGINT", "UINTEGER", "USMALLINT", "UTINYINT", "HUGEINT"):
        raise CaptionSourceError(f"caption source {src.name}: column 'image_id' must be string or integer, got {cols['image_id']}")
    if cols["caption"] == "BLOB":
        bad = con.execute(
            """SELECT image_id FROM read_parquet($path)
               WHERE caption IS NOT NULL AND try(decode(caption)) IS NULL LIMIT 1""",
            {"path": src.parquet_path},
        ).fetchone()
        if bad:
            raise CaptionSourceError(f"caption source {src.name}: the caption of image_id {bad[0]} is not valid UTF-8")
        raw = "decode(caption)"
    elif cols["caption"] == "VARCHAR":
        raw = "caption"
    else:
        raise CaptionSourceError(f"caption source {src.name}: column 'caption' must be string, got {cols['caption']}")
    status = "coalesce(CAST(status AS VARCHAR), 'ok')" if "status" in cols else "'ok'"
    ws = _WS.replace("'", "''")
    return f"""
        SELECT image_id, rtrim(left(t, $max_chars), '{ws}') AS text, status, row_number,
               nullif(concat_ws(',', CASE WHEN has_nul THEN 'caption_nul_removed' END,
                                     CASE WHEN length(t) > $max_chars THEN 'caption_truncated' END), '') AS flags
        FROM (
            SELECT CAST(image_id AS VARCHAR) AS image_id,
                   trim(replace({raw}, chr(0), ''), '{ws}') AS t,
                   contains({raw}, chr(0)) AS has_nul,
                   {status} AS status, file_row_number AS row_number
            FROM read_parquet($path, file_row_number = true) WHERE image_id IS NOT NULL
        )"""


def check_landing_captions(con, src: LandingSource, max_chars: int) -> int:
    """Read every row once (so encoding errors surface now); returns the row count."""
    sql = landing_captions_sql(con, src)
    try:
        # sum(length(text)) makes DuckDB decode every caption, so bad text fails here.
        return con.execute(
            f"SELECT count(*), sum(length(text)) FROM ({sql})", {"path": src.parquet_path, "max_chars": max_chars}
        ).fetchone()[0]
    except CaptionSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. invalid UTF-8 in a string column
        raise CaptionSourceError(f"caption source {src.name}: cannot read captions ({exc})") from None


def read_landing_captions(src: LandingSource, max_chars: int) -> pa.Table:
    """One landing source's cleaned captions as an Arrow table (image_id, text, status, flags)."""
    import duckdb

    con = duckdb.connect()
    try:
        sql = landing_captions_sql(con, src)
        return con.execute(
            f"SELECT image_id, text, status, flags FROM ({sql}) ORDER BY row_number",
            {"path": src.parquet_path, "max_chars": max_chars},
        ).to_arrow_table()
    finally:
        con.close()


def load_landing_source(
    con, name: str, parquet: Path, meta: Path, selectors: list[str], max_chars: int
) -> LandingSource:
    """Validate one landing pair completely (json, variant, columns, text); CaptionSourceError
    says why it cannot be used. `con` is any DuckDB connection (it reads the parquet)."""
    src = read_landing_meta(name, parquet, meta)
    if src.variant not in selectors:
        raise CaptionSourceError(
            f"caption source {name}: variant {src.variant!r} is not in captions.selectors {list(selectors)}"
        )
    check_landing_captions(con, src, max_chars)
    return src


def landing_fingerprint(parquet: Path, meta: Path) -> str:
    """Content identity of a landing pair: a changed file is a new source version."""
    h = hashlib.sha256()
    for p in (parquet, meta):
        h.update(file_sha256(p).encode())
    return h.hexdigest()


# The waterfall ---------------------------------------------------------------------------

WATERFALL_SQL = """
WITH sel AS (
    SELECT * FROM (SELECT unnest($selectors) AS variant, generate_subscripts($selectors, 1) - 1 AS selector_index)
),
candidates AS (
    SELECT c.image_id, c.text, c.variant, sel.selector_index, s.source_id,
           row_number() OVER (
               PARTITION BY c.image_id
               ORDER BY sel.selector_index, s.created_at DESC, s.source_id DESC
           ) AS rn
    FROM captions c
    JOIN sel ON sel.variant = c.variant
    JOIN caption_sources s ON s.source_id = c.source_id
    WHERE c.status = 'ok' AND c.text IS NOT NULL AND length(trim(c.text, ' \t\n\r')) > 0
)
SELECT i.image_id,
       coalesce(w.text, '') AS text,
       w.variant AS caption_variant,
       w.selector_index AS caption_selector_index,
       w.source_id AS caption_source_id,
       CASE WHEN w.image_id IS NOT NULL THEN 'selected'
            WHEN $missing = 'drop' THEN 'dropped' ELSE 'empty' END AS status
FROM wanted_images i
LEFT JOIN (SELECT * FROM candidates WHERE rn = 1) w USING (image_id)
"""


def build_caption_table(
    con, inputs: list[tuple[str, str, str]], landing: list[LandingSource], max_chars: int
) -> tuple[list[dict], dict[str, int]]:
    """Tables caption_sources and captions from raw_index and validated landing sources.
    Returns the source rows and, per landing source, how many captions name unknown image ids."""
    from bucket_assets.core.db import replace_table

    rows = caption_source_rows(inputs, landing)
    ids = {(r["kind"], r["name"]): r["source_id"] for r in rows}
    replace_table(con, "caption_sources", pa.Table.from_pylist(rows, schema=CAPTION_SOURCES_SCHEMA))
    # Each input source's own captions; the first record of a (source, id) pair speaks for it.
    con.execute(
        """CREATE OR REPLACE TABLE captions AS
           SELECT r.image_id, s.source_id, s.variant, r.caption AS text,
                  CASE WHEN r.caption IS NULL OR r.caption = '' THEN 'empty' ELSE 'ok' END AS status,
                  r.notes AS flags
           FROM raw_index r JOIN caption_sources s ON s.kind = 'input' AND s.name = r.source
           QUALIFY row_number() OVER (PARTITION BY r.source, r.image_id ORDER BY r.row_id) = 1"""
    )
    unknown = {}
    for src in landing:
        sql = landing_captions_sql(con, src)
        params = {"path": src.parquet_path, "max_chars": max_chars}
        # One caption per image per source: the first row for an id wins.
        con.execute(
            f"""INSERT INTO captions
                SELECT image_id, $sid, $variant, text, status, flags FROM ({sql})
                QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY row_number) = 1""",
            {**params, "sid": ids[("landing", src.name)], "variant": src.variant},
        )
        unknown[src.name] = con.execute(
            f"""SELECT count(*) FROM ({sql}) c
                WHERE NOT EXISTS (SELECT 1 FROM raw_index r WHERE r.image_id = c.image_id)""",
            params,
        ).fetchone()[0]
    return rows, unknown


def select_captions(con, selectors: list[str], missing: str) -> None:
    """Table selected_captions: the waterfall over every image with an ok bucket assignment."""
    con.execute(
        """CREATE OR REPLACE TEMP VIEW wanted_images AS
           SELECT DISTINCT image_id FROM bucket_assignments WHERE status = 'ok'"""
    )
    con.execute("CREATE OR REPLACE TABLE selected_captions AS " + select_captions_sql(), {"selectors": selectors, "missing": missing})


def select_captions_sql() -> str:
    """SQL over tables `captions`, `caption_sources` and `wanted_images(image_id)`.

    Rules: the first selector (variant) with an ok, non-empty caption wins; within a selector the
    newest source (created_at, then the higher source_id) wins. Images without any get an empty
    caption (missing=empty) or status 'dropped' (missing=drop). Parameters: $selectors, $missing.
    """
    return WATERFALL_SQL


CAPTION_SOURCES_SCHEMA = pa.schema(
    [
        ("source_id", pa.int32()),
        ("name", pa.string()),
        ("kind", pa.string()),  # input (a dataset source's own captions) | landing
        ("variant", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("created_at", pa.int64()),
        ("system_prompt_sha256", pa.string()),
        ("user_prompt_sha256", pa.string()),
        ("file", pa.string()),
        ("fingerprint", pa.string()),
    ]
)


def caption_source_rows(inputs: list[tuple[str, str, str]], landing: list[LandingSource]) -> list[dict]:
    """The caption source table. inputs: (source name, source kind, caption_variant).

    Ids are 1.. in (created_at, kind, name) order: input sources (created_at 0) first, then landing
    sources oldest first, so a newly landed (newer) source takes the next id and existing ids stay.
    """
    rows = [
        dict(name=n, kind="input", variant=v, backend="source", model=f"{k}:{n}", created_at=0,
             system_prompt_sha256=None, user_prompt_sha256=None, file=None, fingerprint=None)
        for n, k, v in inputs
    ]
    rows += [
        dict(name=s.name, kind="landing", variant=s.variant, backend=s.backend, model=s.model,
             created_at=s.created_at, system_prompt_sha256=s.system_prompt_sha256,
             user_prompt_sha256=s.user_prompt_sha256, file=os.path.basename(s.parquet_path),
             fingerprint=s.fingerprint)
        for s in landing
    ]
    rows.sort(key=lambda r: (r["created_at"], r["kind"] != "input", r["name"]))
    for i, r in enumerate(rows, start=1):
        r["source_id"] = i
    return rows


CHANGED_BUCKETS_SQL = """
WITH wanted AS (
    SELECT p.bucket_id, p.image_id, sc.text, sc.caption_variant, sc.caption_selector_index, sc.caption_source_id
    FROM processed_images p JOIN selected_captions sc USING (image_id)
    WHERE p.status = 'ok' AND sc.status <> 'dropped'
),
written AS (
    SELECT bucket_id, image_id, text, caption_variant, caption_selector_index, caption_source_id FROM shard_samples
),
diff AS (
    (SELECT * FROM wanted EXCEPT SELECT * FROM written)
    UNION ALL
    (SELECT * FROM written EXCEPT SELECT * FROM wanted)
)
SELECT DISTINCT bucket_id FROM diff ORDER BY bucket_id
"""


def changed_buckets(con) -> list[str]:
    """Buckets whose written samples differ from what the current caption selection wants
    (a caption, its provenance, or a sample dropped or added by the missing-caption policy)."""
    return [r[0] for r in con.execute(CHANGED_BUCKETS_SQL).fetchall()]
