"""URL lists: metadata parquet(s) with an id and a URL per image (LAION-400M metadata,
photo-concept-bucket). `request_batches` lists what to fetch; `scan` turns each row into a record
located at its downloaded bytes, or carrying the download's failure reason as its issue."""

from __future__ import annotations

from typing import Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bucket_assets.core.download import blob_path
from bucket_assets.core.sources import RawRecord, ScanStats, stat_token
from bucket_assets.core.sources.parquet import (
    SourceError, files as parquet_files, fill_from_columns, missing_id, open_streaming, read_rows,
)
from bucket_assets.core.sources.values import is_regular_file
from bucket_assets.spec import UrlSource

_NUMERIC = ("width", "height")


files = parquet_files  # a URL source's metadata files are found as a parquet source's


def _check_schema(source: UrlSource, path: str) -> list[str]:
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"source {source.name}: cannot read parquet {path}: {exc}") from None
    cols = source.columns
    for role, col in cols.model_dump().items():
        if col is not None and col not in schema.names:
            raise SourceError(f"source {source.name}: {path} has no column {col!r} (columns.{role})")
    t = schema.field(cols.id).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise SourceError(f"source {source.name}: column {cols.id!r} (columns.id) must be string or integer, got {t}")
    t = schema.field(cols.url).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise SourceError(f"source {source.name}: column {cols.url!r} (columns.url) must be string, got {t}")
    for role in _NUMERIC:
        col = getattr(cols, role)
        if col is not None and not (pa.types.is_integer(schema.field(col).type) or pa.types.is_floating(schema.field(col).type)):
            raise SourceError(f"source {source.name}: column {col!r} (columns.{role}) must be numeric, got {schema.field(col).type}")
    return [c for c in cols.model_dump().values() if c is not None]


def fingerprint(path: str) -> str:
    """A metadata file's stat (its records also depend on the source's url_downloads rows,
    which the scan cache checks on its own)."""
    return stat_token(path)


def _columns(source: UrlSource, path: str) -> list[str]:
    if not is_regular_file(path):
        raise SourceError(f"source {source.name}: {path} is not a regular file (symlinks and FIFOs are not read)")
    return sorted(set(_check_schema(source, path)))


def file_rows(source: UrlSource, path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """(row index in the file, row) for rows [start, stop) of one metadata file."""
    yield from read_rows(source.name, path, _columns(source, path), start, stop)


def file_ids(source: UrlSource, path: str, start: int = 0, stop: int | None = None) -> set[str]:
    """The ids of rows [start, stop) of one metadata file (only the id column is read)."""
    _columns(source, path)
    col = source.columns.id
    return {str(row[col]) for _i, row in read_rows(source.name, path, [col], start, stop) if row[col] is not None}


def _rows(source: UrlSource) -> Iterator[tuple[str, int, dict]]:
    """(file, row index in the file, row) for every row of every file."""
    for path in files(source):
        for i, row in file_rows(source, path):
            yield path, i, row


def request_batches(source: UrlSource, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
    """Every row with an id as (image_id, url), in file then row order, in batches of at most
    `batch_rows`: the id as text (an integer id as its digits), a missing URL as "". A later
    row with the same id is left in; the caller keeps the first (url_downloads does, in SQL)."""
    cols = source.columns
    for path in files(source):
        _columns(source, path)
        try:
            pf = open_streaming(path)
            for g in range(pf.metadata.num_row_groups):
                # One row group at a time: an iterator over several keeps what it decoded of each.
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=[cols.id, cols.url],
                                             use_threads=False):
                    ids = pc.cast(batch.column(cols.id), pa.string())
                    urls = pc.fill_null(pc.cast(batch.column(cols.url), pa.string()), "")
                    keep = pc.is_valid(ids)
                    yield pa.RecordBatch.from_arrays([pc.filter(ids, keep), pc.filter(urls, keep)],
                                                     names=["image_id", "url"])
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise SourceError(f"source {source.name}: cannot read parquet {path}: {exc}") from None


def scan_file(source: UrlSource, path: str, stats: ScanStats, max_caption_chars: int, downloads: Mapping[str, dict],
              store: str, start: int = 0, stop: int | None = None,
              seen: set[str] | None = None) -> Iterator[tuple[RawRecord, RawRecord | None]]:
    """Rows [start, stop) of one metadata file as (record, its duplicate form): what the record
    would be if an earlier row of the source had its id (None for a row without an id). `seen`:
    ids of earlier rows (those of this range are added); the scan cache finds the earlier rows
    of other files and ranges itself and gives them their duplicate form."""
    cols = source.columns
    seen = set() if seen is None else seen
    for i, row in file_rows(source, path, start, stop):
        raw_id = row[cols.id]
        if raw_id is None:
            yield missing_id(source.name, path, i, row), None
            continue
        image_id = str(raw_id)
        dup = RawRecord(image_id=image_id, source=source.name, location=None, meta=row, issue="duplicate_id",
                        issue_detail=f"{path}: row {i}: an earlier row has this id")
        if image_id in seen:  # the first row with an id is the one fetched and indexed
            yield dup, None
            continue
        seen.add(image_id)
        rec = RawRecord(image_id=image_id, source=source.name, location=None, meta=row)
        fill_from_columns(rec, row.__getitem__, cols, max_caption_chars)
        got = downloads.get(image_id)
        if got is None or got["url"] != (rec.url or ""):
            rec.issue, rec.issue_detail = "not_downloaded", "no download result for this URL: materialize url_downloads"
        elif got["status"] != "ok":
            rec.issue, rec.issue_detail = got["status"], got["detail"]
        else:
            rec.location = str(blob_path(store, got["sha256"]))
        yield rec, dup


def scan(source: UrlSource, stats: ScanStats, max_caption_chars: int, downloads: Mapping[str, dict],
         store: str) -> Iterator[RawRecord]:
    """`downloads`: image_id -> the url_downloads row for this source."""
    seen: set[str] = set()
    for path in files(source):
        for rec, _dup in scan_file(source, path, stats, max_caption_chars, downloads, store, seen=seen):
            yield rec
