"""The raw index: one row per source record, with its bytes located, hashed and header-probed."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import pyarrow as pa

from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.imaging import ImageError, probe
from bucket_assets.core.parallel import ordered_map
from bucket_assets.core.progress import Progress
from bucket_assets.core.sources import RawRecord, ScanStats, read_bytes, scan_source
from bucket_assets.spec import Spec


class DuplicateIdError(ValueError):
    pass


RAW_INDEX_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),  # global order: source order in the spec, then scan order
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("source_kind", pa.string()),
        ("location", pa.string()),
        ("member", pa.string()),
        ("data_offset", pa.int64()),
        ("byte_size", pa.int64()),
        ("sha256", pa.string()),
        ("width", pa.int32()),  # EXIF-corrected
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("orientation", pa.int8()),
        ("caption", pa.string()),
        ("caption_field", pa.string()),
        ("url", pa.string()),
        ("similarity", pa.float64()),
        ("nsfw", pa.string()),
        ("license", pa.string()),
        ("orig_w", pa.int32()),
        ("orig_h", pa.int32()),
        ("source_meta", pa.string()),  # the source's own metadata record, as JSON
        ("issue", pa.string()),  # why this record cannot be used, if known at index time
        ("issue_detail", pa.string()),
        ("notes", pa.string()),  # comma-separated non-fatal flags
    ]
)


def _probe_task(task: tuple[str | None, str | None, int | None, int | None, int]) -> dict:
    location, member, offset, size, max_pixels = task
    out: dict = {"sha256": None, "byte_size": None, "issue": None, "issue_detail": None}
    try:
        data = read_bytes(location, member, offset, size)  # type: ignore[arg-type]
    except (OSError, MemoryError, ValueError) as exc:
        out.update(issue="read_error", issue_detail=str(exc) or type(exc).__name__)
        return out
    out["byte_size"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        h = probe(data, max_pixels)
    except ImageError as exc:
        out.update(issue=exc.reason, issue_detail=exc.detail)
        return out
    out.update(width=h.width, height=h.height, format=h.format, mode=h.mode, orientation=h.orientation)
    return out


def scan_all(spec: Spec, downloads: dict[str, dict[str, dict]] | None = None) -> tuple[list[RawRecord], ScanStats]:
    """Every record of every source, in spec order; an id in two sources is an error naming both.
    `downloads`: source name -> image_id -> url_downloads row, for URL sources."""
    stats = ScanStats()
    records: list[RawRecord] = []
    owner: dict[str, str] = {}
    downloads = downloads or {}
    for source in spec.sources:
        for rec in scan_source(source, stats, spec.captions.max_chars, downloads.get(source.name, {}), str(spec.downloads_dir)):
            if rec.issue == "missing_id":  # a made-up id: it names the row, not an image
                records.append(rec)
                continue
            prev = owner.get(rec.image_id)
            if prev is not None and prev != rec.source:
                raise DuplicateIdError(
                    f"image_id {rec.image_id!r} appears in two sources: {prev!r} and {rec.source!r}"
                )
            owner[rec.image_id] = rec.source
            records.append(rec)
            failpoint("scan")
    return records, stats


def record_row(row_id: int, rec: RawRecord, kind: str) -> dict:
    """A scanned (sources.finalize'd) record as a raw index row, before its probe."""
    return {
        "row_id": row_id,
        "image_id": rec.image_id,
        "source": rec.source,
        "source_kind": kind,
        "location": rec.location,
        "member": rec.member,
        "data_offset": rec.offset,
        "byte_size": rec.size,
        "caption": rec.caption,
        "caption_field": rec.caption_field,
        "url": rec.url,
        "similarity": rec.similarity,
        "nsfw": rec.nsfw,
        "license": rec.license,
        "orig_w": rec.orig_w,
        "orig_h": rec.orig_h,
        "source_meta": None if rec.meta is None else json.dumps(
            rec.meta, sort_keys=True, default=str, ensure_ascii=False, allow_nan=False),
        "issue": rec.issue,
        "issue_detail": rec.issue_detail,
        "notes": ",".join(rec.notes) or None,
    }


def build_raw_index(
    spec: Spec, workers: int, report: Callable[[str], None] | None = None,
    downloads: dict[str, dict[str, dict]] | None = None,
) -> tuple[pa.Table, ScanStats]:
    """`report` receives a progress line every few seconds while the records are hashed and probed."""
    records, stats = scan_all(spec, downloads)
    kinds = {s.name: s.kind for s in spec.sources}
    tasks = [
        (r.location, r.member, r.offset, r.size, spec.image.max_pixels)
        for r in records
        if r.issue is None
    ]
    probed = iter(ordered_map(_probe_task, tasks, workers, chunksize=16))
    progress = Progress("raw_index: records probed", len(tasks), report)
    rows = []
    for row_id, rec in enumerate(records):
        row = record_row(row_id, rec, kinds[rec.source])
        if rec.issue is None:
            row.update(next(probed))
            progress.advance()
        rows.append(row)
    progress.close()
    table = pa.Table.from_pylist(rows, schema=RAW_INDEX_SCHEMA)
    return table, stats


SCAN_SKIPS_SCHEMA = pa.schema([("scope", pa.string()), ("reason", pa.string()), ("count", pa.int64())])


def scan_skips_table(stats: ScanStats) -> pa.Table:
    """What a scan skipped that is not a record: scope 'member' (tar members that are not
    samples) or 'file' (whole source files that could not be read)."""
    rows = [{"scope": "member", "reason": k, "count": v} for k, v in sorted(stats.counts.items())]
    rows += [{"scope": "file", "reason": k, "count": v} for k, v in sorted(stats.files.items())]
    return pa.Table.from_pylist(rows, schema=SCAN_SKIPS_SCHEMA)
