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
import pyarrow.parquet as pq

REQUIRED_META = ("variant", "backend", "model", "created_at", "system_prompt_sha256", "user_prompt_sha256")
_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


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
    text = text.strip()
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
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


def read_landing_captions(src: LandingSource, max_chars: int) -> pa.Table:
    """image_id, text, status, flags of one landing parquet; a clear error on bad columns."""
    try:
        table = pq.read_table(src.parquet_path)
    except Exception as exc:  # noqa: BLE001
        raise CaptionSourceError(f"caption source {src.name}: cannot read parquet ({exc})") from None
    for col in ("image_id", "caption"):
        if col not in table.column_names:
            raise CaptionSourceError(f"caption source {src.name}: missing column {col!r}")
    ids = table.column("image_id")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_integer(ids.type)):
        raise CaptionSourceError(f"caption source {src.name}: column 'image_id' must be string or integer, got {ids.type}")
    cap = table.column("caption")
    if not (pa.types.is_string(cap.type) or pa.types.is_large_string(cap.type) or pa.types.is_binary(cap.type)):
        raise CaptionSourceError(f"caption source {src.name}: column 'caption' must be string, got {cap.type}")
    try:
        raw_caps = cap.to_pylist()
        statuses = table.column("status").to_pylist() if "status" in table.column_names else [None] * table.num_rows
    except UnicodeDecodeError:
        raise CaptionSourceError(f"caption source {src.name}: text is not valid UTF-8") from None
    out_ids, out_text, out_status, out_flags = [], [], [], []
    for image_id, raw, status in zip(ids.to_pylist(), raw_caps, statuses):
        if image_id is None:
            continue
        text, flags = clean_caption(raw, max_chars)
        if "caption_not_utf8" in flags:
            raise CaptionSourceError(
                f"caption source {src.name}: the caption of image_id {image_id!s} is not valid UTF-8"
            )
        out_ids.append(str(image_id))
        out_text.append(text)
        out_status.append(str(status) if status is not None else "ok")
        out_flags.append(",".join(flags) or None)
    return pa.table({"image_id": out_ids, "text": out_text, "status": out_status, "flags": out_flags})


def load_landing_source(
    name: str, parquet: Path, meta: Path, selectors: list[str], max_chars: int
) -> tuple[LandingSource, pa.Table]:
    """Validate one landing pair completely; CaptionSourceError says why it cannot be used."""
    src = read_landing_meta(name, parquet, meta)
    if src.variant not in selectors:
        raise CaptionSourceError(
            f"caption source {name}: variant {src.variant!r} is not in captions.selectors {list(selectors)}"
        )
    return src, read_landing_captions(src, max_chars)


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
