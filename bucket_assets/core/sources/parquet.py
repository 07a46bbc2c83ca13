"""photo-concept-bucket style: a parquet of metadata plus an image folder keyed by id."""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.captions import clean_caption
from bucket_assets.core.sources import RawRecord, ScanStats, dir_state, stat_token
from bucket_assets.core.sources.values import is_regular_file
from bucket_assets.spec import ParquetColumns, ParquetSource


class SourceError(ValueError):
    pass


def _text(value) -> str | bytes | None:
    if value is None or (isinstance(value, float) and value != value):  # NaN is "no value", not "nan"
        return None
    if isinstance(value, (list, tuple)):  # e.g. a list of tags
        return ", ".join(str(v) for v in value if v is not None)
    if isinstance(value, (str, bytes)):
        return value
    return str(value)


def missing_id(source_name: str, path: str, row: int, meta: dict) -> RawRecord:
    """A row without an id is still a record: it is counted under reason missing_id."""
    stem = os.path.basename(path).rsplit(".", 1)[0]
    return RawRecord(image_id=f"{stem}-{row}", source=source_name, location=None, meta=meta,
                     issue="missing_id", issue_detail=f"{path}: row {row} has a null id")


def extensions(source: ParquetSource) -> list[str]:
    return [e.lower().lstrip(".") for e in source.image_extensions]


def fingerprint(source: ParquetSource) -> str:
    """The parquet file's stat and the image dir's image entries (a record's image is found by
    name there): what the records depend on, without opening anything."""
    return f"{stat_token(source.path)}|{dir_state(source.image_dir, extensions(source), only_candidates=True).token}"


def num_rows(path: str) -> int | None:
    """Rows of a parquet file from its footer; None when it is not a regular file or cannot be
    read (its scan then names the reason)."""
    if not is_regular_file(path):
        return None
    try:
        return pq.read_metadata(path).num_rows
    except Exception:  # noqa: BLE001 - any unreadable file: the scan reports it
        return None


def row_range(pf: pq.ParquetFile, columns: list[str] | None, start: int, stop: int | None,
              batch_size: int = 4096) -> Iterator[tuple[int, dict]]:
    """(row index in the file, {column: value}) for rows [start, stop), reading only the row
    groups that hold them, a batch at a time."""
    meta = pf.metadata
    groups, first, offset = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if offset + n > start and (stop is None or offset < stop):
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return
    names = columns if columns is not None else list(pf.schema_arrow.names)
    row = first
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
        if row + batch.num_rows <= start:
            row += batch.num_rows
            continue
        data = {n: batch.column(n).to_pylist() for n in names}
        for i in range(batch.num_rows):
            if row >= start and (stop is None or row < stop):
                yield row, {n: data[n][i] for n in names}
            row += 1
        if stop is not None and row >= stop:
            return


def scan(source: ParquetSource, stats: ScanStats, max_caption_chars: int, start: int = 0,
         stop: int | None = None) -> Iterator[RawRecord]:
    """The records of rows [start, stop) of the source's parquet (all of them by default)."""
    cols = source.columns
    wanted = {
        "id": cols.id,
        "caption": cols.caption,
        "fallback_caption": cols.fallback_caption,
        "width": cols.width,
        "height": cols.height,
        "url": cols.url,
        "license": cols.license,
    }
    if not is_regular_file(source.path):
        raise SourceError(f"source {source.name}: {source.path} is not a regular file (symlinks and FIFOs are not read)")
    try:
        schema = pq.read_schema(source.path)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"source {source.name}: cannot read parquet {source.path}: {exc}") from None
    for role, col in wanted.items():
        if col is not None and col not in schema.names:
            raise SourceError(f"source {source.name}: parquet has no column {col!r} (columns.{role})")
    id_type = schema.field(cols.id).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise SourceError(f"source {source.name}: column {cols.id!r} (columns.id) must be string or integer, got {id_type}")
    for role in ("width", "height"):
        col = wanted[role]
        if col is not None and not pa.types.is_integer(schema.field(col).type) and not pa.types.is_floating(schema.field(col).type):
            raise SourceError(f"source {source.name}: column {col!r} (columns.{role}) must be numeric, got {schema.field(col).type}")

    # One directory listing instead of a stat per row.
    exts = extensions(source)
    by_stem: dict[str, str] = {}
    with os.scandir(source.image_dir) as it:
        for entry in it:
            stem, dot, ext = entry.name.rpartition(".")
            if dot and ext.lower() in exts and entry.is_file(follow_symlinks=False):
                prev = by_stem.get(stem)
                if prev is None or exts.index(ext.lower()) < exts.index(prev.rpartition(".")[2].lower()):
                    by_stem[stem] = entry.name

    for row, values in read_rows(source.name, source.path, None, start, stop):
        raw_id = values[cols.id]
        if raw_id is None:
            yield missing_id(source.name, source.path, row, values)
            continue
        image_id = str(raw_id)
        rec = RawRecord(image_id=image_id, source=source.name, location=None, meta=values)
        fname = by_stem.get(image_id)
        if fname is None:
            rec.issue = "missing_file"
            rec.issue_detail = f"no {image_id}.{{{','.join(exts)}}} in {source.image_dir}"
        else:
            rec.location = os.path.join(source.image_dir, fname)
        fill_from_columns(rec, values.__getitem__, cols, max_caption_chars)
        yield rec


def read_rows(source_name: str, path: str, columns: list[str] | None, start: int = 0,
              stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """row_range of a parquet file, with a file that fails to decode part way named as the
    source's error (one line), not a traceback."""
    try:
        yield from row_range(pq.ParquetFile(path), columns, start, stop)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise SourceError(f"source {source_name}: cannot read parquet {path}: {exc}") from None


def fill_from_columns(rec: RawRecord, value, cols: ParquetColumns, max_caption_chars: int) -> None:
    """Set a record's caption (with the fallback column where it is empty), original size, url,
    license and, for URL sources, similarity and NSFW tag from its row; `value(column)` reads
    the row."""
    if cols.caption:
        rec.caption, flags = clean_caption(_text(value(cols.caption)), max_caption_chars)
        rec.caption_field = cols.caption
        rec.notes.extend(flags)
    if not rec.caption and cols.fallback_caption:
        fb, flags = clean_caption(_text(value(cols.fallback_caption)), max_caption_chars)
        if fb:
            rec.caption, rec.caption_field = fb, cols.fallback_caption
            rec.notes.extend(flags)
    if cols.width and cols.height:
        rec.orig_w, rec.orig_h = value(cols.width), value(cols.height)  # checked by sources.finalize
    if cols.url:
        rec.url = _text(value(cols.url))
    if cols.license:
        rec.license = _text(value(cols.license))
    if getattr(cols, "similarity", None):
        rec.similarity = value(cols.similarity)  # checked by sources.finalize
    if getattr(cols, "nsfw", None):
        rec.nsfw = _text(value(cols.nsfw))
