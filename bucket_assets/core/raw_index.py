"""The raw index: one row per source record, with its bytes located, hashed and header-probed.

A source is a list of scan units (each tar, the parquet file with its image dir, each folder
directory, each URL metadata file); a unit is scanned in parts of at most a few thousand
records. `scan_part` is the work of one part, run by a compute-engine worker (a pool process or
a Celery worker): it scans the part, reads, hashes and probes its images, and writes the part's
rows as a parquet fragment in bounded batches, then a small JSON summary beside it (the commit
point); it returns that summary. Workers never touch DuckDB: core/scan_cache.py decides which
parts to scan, and builds the raw_index table from the fragments.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.atomic import atomic_write_text, atomic_writer
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.imaging import ImageError, probe
from bucket_assets.core.sources import RawRecord, ScanStats, finalize, read_bytes, stat_token
from bucket_assets.core.sources.parquet import SourceError
from bucket_assets.spec import FolderSource, ParquetSource, Source, Spec, UrlSource, WebDatasetSource

# Bump when a reader or the probe changes what a record's row holds: every cached fragment is
# then scanned again.
SCAN_VERSION = 1


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


def _probe_task(task: tuple[str | None, str | None, int | None, int | None, int], data: bytes | None = None,
                where: str | None = None) -> dict:
    """Hash and probe a record's image: `data` when the scan holds its bytes already, else read
    from where it is. `where` names the bytes in a failure's detail (a parquet row)."""
    location, member, offset, size, max_pixels = task
    out: dict = {"sha256": None, "byte_size": None, "issue": None, "issue_detail": None}
    if data is None:
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
        out.update(issue=exc.reason, issue_detail=f"{where}: {exc.detail}" if where else exc.detail)
        return out
    out.update(width=h.width, height=h.height, format=h.format, mode=h.mode, orientation=h.orientation)
    return out


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


# A fragment holds a part's rows in order, without row_id (the scan cache numbers them), plus,
# for URL sources, what each row becomes if an earlier row of the source (in another file or part)
# has its id.
FRAGMENT_SCHEMA = pa.schema(
    [f for f in RAW_INDEX_SCHEMA if f.name != "row_id"]
    + [pa.field("dup_issue_detail", pa.string()), pa.field("dup_notes", pa.string())]
)
FRAGMENT_BATCH = 512  # rows per parquet write: a part's rows are never all held at once

# The url_downloads columns a URL record depends on, hashed into the part's downloads digest.
DOWNLOAD_FIELDS = ("image_id", "url", "status", "detail", "sha256")


@dataclass
class ScanTask:
    """One part of one scan unit. JSON-encodable (dataclasses.asdict) for Celery workers."""

    source: dict  # the source's spec (model_dump(mode="json"))
    unit: str  # the tar, the parquet file, the folder directory or the URL metadata file
    fingerprint: str  # the unit's state as the coordinator listed it (ScanCache.units)
    start: int  # records [start, stop) of the unit (stop None: to the end)
    stop: int | None
    max_chars: int
    max_pixels: int
    fragment: str  # where the part's rows go; the summary goes to summary_path(fragment)
    downloads: str | None = None  # URL sources: a parquet of the source's url_downloads rows
    store: str | None = None  # URL sources: the download store


def summary_path(fragment: str | os.PathLike) -> str:
    return os.fspath(fragment).removesuffix(".parquet") + ".json"


def unstable_path(fragment: str | os.PathLike) -> str:
    return os.fspath(fragment).removesuffix(".parquet") + ".unstable.parquet"


_ADAPTER = None


def parse_source(d: dict) -> Source:
    global _ADAPTER
    if _ADAPTER is None:
        from pydantic import TypeAdapter

        _ADAPTER = TypeAdapter(Source)
    return _ADAPTER.validate_python(d)


def _unit_token(source: Source, unit: str) -> str:
    """The cheap part of a unit's state a worker takes before and after its scan: the lstat of
    the tar (with its img2dataset shard parquet's), the URL file, the parquet file, or of the
    folder directory itself. (A folder's or image dir's full digest lists every entry, which
    each part would pay for; the files a part reads are checked one by one instead.)"""
    if isinstance(source, WebDatasetSource):
        from bucket_assets.core.sources import webdataset

        return webdataset.fingerprint(source, unit)
    return stat_token(unit)


def _listed_token(source: Source, fingerprint: str) -> str | None:
    """What _unit_token must equal in the coordinator's fingerprint (None: not part of it)."""
    if isinstance(source, FolderSource):
        return None
    if isinstance(source, WebDatasetSource):
        return fingerprint  # the tar's and its shard parquet's lstat, as _unit_token takes them
    return fingerprint.split("|", 1)[0]  # a parquet file's part (not its image dir's); a URL file's whole


def downloads_digest(rows: Iterable[dict]) -> list[str]:
    """An order-independent digest of url_downloads rows: [count, sum of the MD5's first 8 bytes,
    sum of its last 8] (little-endian), the same as scan_cache.DOWNLOADS_DIGEST_SQL computes."""
    n = hi = lo = 0
    for r in rows:
        text = "\x1f".join("\x1e" if r[k] is None else r[k] for k in DOWNLOAD_FIELDS)
        d = hashlib.md5(text.encode("utf-8")).digest()
        hi += int.from_bytes(d[:8], "little")
        lo += int.from_bytes(d[8:], "little")
        n += 1
    return [str(n), str(hi), str(lo)]


def read_downloads(path: str | None, ids: set[str]) -> tuple[dict[str, dict], list[str]]:
    """The url_downloads rows of `ids` from the coordinator's export (only those are loaded)."""
    if path is None or not ids:
        return {}, downloads_digest([])
    rows = pq.read_table(path, columns=list(DOWNLOAD_FIELDS), filters=[("image_id", "in", sorted(ids))]).to_pylist()
    return {r["image_id"]: r for r in rows}, downloads_digest(rows)


def _records(source: Source, task: ScanTask, stats: ScanStats, downloads: dict) -> Iterator[tuple[RawRecord, tuple]]:
    """The part's finalized records in order, each with (dup_issue_detail, dup_notes)."""
    from bucket_assets.core.sources import folder, parquet, urls, webdataset

    none = (None, None)
    if isinstance(source, WebDatasetSource):
        records = webdataset.scan_file(source, task.unit, stats, task.max_chars)
    elif isinstance(source, ParquetSource):
        records = parquet.scan_file(source, task.unit, stats, task.max_chars, task.start, task.stop)
    elif isinstance(source, FolderSource):
        records = folder.scan_dir(source, task.unit, stats, task.max_chars, task.start, task.stop)
    else:
        for rec, dup in urls.scan_file(source, task.unit, stats, task.max_chars, downloads, str(task.store),
                                       task.start, task.stop):
            rec = finalize(rec)
            if dup is None:
                yield rec, ((rec.issue_detail, ",".join(rec.notes) or None) if rec.issue == "duplicate_id" else none)
            else:
                dup = finalize(dup)
                yield rec, (dup.issue_detail, ",".join(dup.notes) or None)
        return
    for rec in records:
        yield finalize(rec), none


def unit_rows(source: Source, unit: str) -> int | None:
    """Rows of a parquet or URL metadata file (its parts are ranges of them); None otherwise."""
    from bucket_assets.core.sources.parquet import num_rows

    if isinstance(source, (ParquetSource, UrlSource)):
        return num_rows(unit)
    return None


def scan_part(task: ScanTask) -> dict:
    """Scan one part, probe its images, write its fragment and commit it with its summary.

    The unit's file (or directory) is stat'ed before and after, and so is every plain file the
    part reads; a part whose input changed meanwhile (or since the coordinator listed it) is not
    committed: its fragment is moved to its `.unstable.parquet` name, used by this build only,
    and the part is scanned again next time. (A committed part is only ever reused under the
    fingerprint the coordinator listed before the scan, so a change the worker cannot see still
    gives the next build another key.)
    Returns the summary (rows, skip counts, file-level skips, a bounded list of notes, the
    fingerprint seen), or one with `error` for a source that cannot be read at all."""
    from bucket_assets.core.sources import urls

    source = parse_source(task.source)
    before = _unit_token(source, task.unit)
    listed = _listed_token(source, task.fingerprint)
    stats = ScanStats()
    summary: dict = {"version": SCAN_VERSION, "source": source.name, "unit": task.unit, "start": task.start,
                     "stop": task.stop, "worker": f"{socket.gethostname()}:{os.getpid()}", "error": None}
    context = os.path.basename(task.unit)
    downloads, digest = {}, None
    n = 0
    read: list[tuple[str, str]] = []  # plain files read (images, folder sidecars) and their lstat then
    plain = isinstance(source, (FolderSource, ParquetSource))
    try:
        if isinstance(source, UrlSource):
            downloads, digest = read_downloads(task.downloads, urls.file_ids(source, task.unit, task.start, task.stop))
        with atomic_writer(task.fragment) as f:
            writer = pq.ParquetWriter(f, FRAGMENT_SCHEMA)
            try:
                batch: list[dict] = []
                for rec, (dup_detail, dup_notes) in _records(source, task, stats, downloads):
                    row = record_row(0, rec, source.kind)
                    del row["row_id"]
                    if rec.issue is None and rec.data is not None:  # bytes the scan read from the unit itself
                        where = f"{rec.location}: row {rec.offset}" + (f" ({rec.hint})" if rec.hint else "")
                        row.update(_probe_task((rec.location, rec.member, rec.offset, rec.size, task.max_pixels),
                                               rec.data, where))
                        rec.data = None
                    elif rec.issue is None:
                        if plain:
                            read.append((rec.location, stat_token(rec.location)))
                            if rec.caption_field == "txt":
                                side = str(Path(rec.location).with_suffix(".txt"))
                                read.append((side, stat_token(side)))
                        row.update(_probe_task((rec.location, rec.member, rec.offset, rec.size, task.max_pixels)))
                    row["dup_issue_detail"], row["dup_notes"] = dup_detail, dup_notes
                    batch.append(row)
                    n += 1
                    failpoint("scan", context)
                    if len(batch) >= FRAGMENT_BATCH:
                        writer.write_table(pa.Table.from_pylist(batch, schema=FRAGMENT_SCHEMA))
                        batch = []
                if batch:
                    writer.write_table(pa.Table.from_pylist(batch, schema=FRAGMENT_SCHEMA))
            finally:
                writer.close()
        rows_in_unit = unit_rows(source, task.unit)
    except SourceError as exc:
        return {**summary, "error": str(exc)}
    after = _unit_token(source, task.unit)
    stable = (before == after and listed in (None, before)
              and all(stat_token(path) == token for path, token in read))
    summary.update(rows=n, counts=stats.counts, files=stats.files, notes=stats.notes, seen=after, stable=stable,
                   unit_rows=rows_in_unit, downloads_digest=digest)
    if stable:
        atomic_write_text(summary_path(task.fragment), json.dumps(summary, sort_keys=True))
    else:
        os.replace(task.fragment, unstable_path(task.fragment))
    return summary


def build_raw_index(spec: Spec, workers: int, report: Callable[[str], None] | None = None) -> tuple[pa.Table, ScanStats]:
    """The raw index of `spec` as an Arrow table (tests, tools): the scan cache in spec.work_dir
    with an in-memory catalog (no url_downloads there: URL records are not_downloaded). The
    build itself uses ScanCache with the dataset's DuckDB and never holds the table in Python."""
    import duckdb

    from bucket_assets.core.scan_cache import ScanCache
    from bucket_assets.distributed import LocalCompute

    con = duckdb.connect()

    @contextmanager
    def db():
        yield con

    try:
        outcome = ScanCache(spec, LocalCompute(workers), report).build(db)
        table = con.execute("SELECT * FROM raw_index ORDER BY row_id").to_arrow_table()
    finally:
        con.close()
    return table, outcome.stats

SCAN_SKIPS_SCHEMA = pa.schema([("scope", pa.string()), ("reason", pa.string()), ("count", pa.int64())])


def scan_skips_table(stats: ScanStats) -> pa.Table:
    """What a scan skipped that is not a record: scope 'member' (tar members that are not
    samples) or 'file' (whole source files that could not be read)."""
    rows = [{"scope": "member", "reason": k, "count": v} for k, v in sorted(stats.counts.items())]
    rows += [{"scope": "file", "reason": k, "count": v} for k, v in sorted(stats.files.items())]
    return pa.Table.from_pylist(rows, schema=SCAN_SKIPS_SCHEMA)
