"""photo-concept-bucket style: a parquet of metadata plus an image folder keyed by id."""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.captions import clean_caption
from bucket_assets.core.sources import RawRecord, ScanStats
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


def scan(source: ParquetSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
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
    exts = [e.lower().lstrip(".") for e in source.image_extensions]
    by_stem: dict[str, str] = {}
    with os.scandir(source.image_dir) as it:
        for entry in it:
            stem, dot, ext = entry.name.rpartition(".")
            if dot and ext.lower() in exts and entry.is_file(follow_symlinks=False):
                prev = by_stem.get(stem)
                if prev is None or exts.index(ext.lower()) < exts.index(prev.rpartition(".")[2].lower()):
                    by_stem[stem] = entry.name

    pf = pq.ParquetFile(source.path)
    names = list(schema.names)
    row = 0
    for batch in pf.iter_batches(batch_size=65536):
        data = {n: batch.column(n).to_pylist() for n in names}
        for i in range(batch.num_rows):
            row += 1
            raw_id = data[cols.id][i]
            if raw_id is None:
                yield missing_id(source.name, source.path, row - 1, {n: data[n][i] for n in names})
                continue
            image_id = str(raw_id)
            rec = RawRecord(image_id=image_id, source=source.name, location=None, meta={n: data[n][i] for n in names})
            fname = by_stem.get(image_id)
            if fname is None:
                rec.issue = "missing_file"
                rec.issue_detail = f"no {image_id}.{{{','.join(exts)}}} in {source.image_dir}"
            else:
                rec.location = os.path.join(source.image_dir, fname)
            fill_from_columns(rec, lambda col: data[col][i], cols, max_caption_chars)
            yield rec


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
