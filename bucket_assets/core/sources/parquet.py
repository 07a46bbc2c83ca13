"""Parquet sources: photo-concept-bucket style (metadata rows plus an image folder keyed by id),
or Hugging Face Hub style (the image bytes in a column, split over many files).

A source's files (a file, a glob or a list, read in sorted order) are its scan units."""

from __future__ import annotations

import bisect
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.captions import clean_caption
from bucket_assets.core.sources import RawRecord, ScanStats, dir_state, matching_files, stat_token
from bucket_assets.core.sources.values import is_regular_file
from bucket_assets.spec import ParquetColumns, ParquetSource, UrlSource, source_paths


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


def row_id(path: str, row: int) -> str:
    """The id of a row when the source has no id column (or the row's id is null)."""
    return f"{os.path.basename(path).rsplit('.', 1)[0]}-{row}"


def missing_id(source_name: str, path: str, row: int, meta: dict) -> RawRecord:
    """A row without an id is still a record: it is counted under reason missing_id."""
    return RawRecord(image_id=row_id(path, row), source=source_name, location=None, meta=meta,
                     issue="missing_id", issue_detail=f"{path}: row {row} has a null id")


def extensions(source: ParquetSource) -> list[str]:
    return [e.lower().lstrip(".") for e in source.image_extensions]


def files(source: ParquetSource | UrlSource) -> list[str]:
    """The source's parquet files in reading order: every match of its path(s), sorted."""
    found = matching_files(source_paths(source.path))
    if not found:
        raise SourceError(f"source {source.name}: no parquet matches {source.path}")
    return found


def fingerprint(source: ParquetSource, path: str) -> str:
    """A parquet file's stat, and for images in a folder the image dir's image entries (a
    record's image is found by name there): what the file's records depend on, without opening
    anything."""
    if source.image_dir is None:
        return stat_token(path)
    return f"{stat_token(path)}|{dir_state(source.image_dir, extensions(source), only_candidates=True).token}"


def num_rows(path: str) -> int | None:
    """Rows of a parquet file from its footer; None when it is not a regular file or cannot be
    read (its scan then names the reason)."""
    if not is_regular_file(path):
        return None
    try:
        return pq.read_metadata(path).num_rows
    except Exception:  # noqa: BLE001 - any unreadable file: the scan reports it
        return None


def open_streaming(source) -> pq.ParquetFile:
    """A ParquetFile that reads column chunks through a small buffer (no pre-buffering): a
    row group is decoded page by page, so memory holds a page and a batch, not the group."""
    return pq.ParquetFile(source, buffer_size=STREAM_BUFFER, pre_buffer=False)


STREAM_BUFFER = 1 << 20


def row_range(pf: pq.ParquetFile, columns: list[str] | None, start: int, stop: int | None,
              batch_size: int = 4096) -> Iterator[tuple[int, dict]]:
    """(row index in the file, {column: value}) for rows [start, stop), reading only the row
    groups that hold them, one group at a time and a batch at a time (one iterator over several
    groups keeps what it decoded of each until it ends)."""
    meta = pf.metadata
    names = columns if columns is not None else list(pf.schema_arrow.names)
    offset = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        first, offset = offset, offset + n
        if offset <= start or (stop is not None and first >= stop):
            continue
        row = first
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g], columns=columns, use_threads=False):
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


def image_column_kind(source_name: str, schema: pa.Schema, col: str) -> str:
    """'struct' (the `datasets` Image feature: {bytes, path}) or 'binary'; anything else is the
    source's error."""
    tp = schema.field(col).type
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp):
        return "binary"
    if pa.types.is_struct(tp):
        names = [tp.field(i).name for i in range(tp.num_fields)]
        if "bytes" in names:
            bt = tp.field("bytes").type
            if pa.types.is_binary(bt) or pa.types.is_large_binary(bt):
                return "struct"
    raise SourceError(f"source {source_name}: column {col!r} (columns.image) must be a struct {{bytes, path}} "
                      f"(the Hugging Face Image feature) or binary, got {tp}")


# Rows per batch when the batch carries image bytes: the scan's memory is one row group's
# column chunk (what parquet decodes at once) plus this many images.
IMAGE_BATCH = 64


def _check_schema(source: ParquetSource, path: str) -> tuple[pa.Schema, str | None]:
    """The file's schema after checking the spec's columns against it, and the id column to
    read (None: ids are "<file stem>-<row>", also where the default `id` column is absent)."""
    cols = source.columns
    if not is_regular_file(path):
        raise SourceError(f"source {source.name}: {path} is not a regular file (symlinks and FIFOs are not read)")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"source {source.name}: cannot read parquet {path}: {exc}") from None
    id_col = cols.id
    if cols.image is not None and id_col == "id" and "id" not in schema.names and "id" not in cols.model_fields_set:
        id_col = None  # Hub datasets rarely have one: rows are named by file and row
    wanted = {
        "id": id_col,
        "caption": cols.caption,
        "fallback_caption": cols.fallback_caption,
        "width": cols.width,
        "height": cols.height,
        "url": cols.url,
        "license": cols.license,
        "similarity": cols.similarity,
        "nsfw": cols.nsfw,
        "image": cols.image,
    }
    for role, col in wanted.items():
        if col is not None and col not in schema.names:
            raise SourceError(f"source {source.name}: parquet has no column {col!r} (columns.{role}) in {path}")
    if id_col is not None:
        id_type = schema.field(id_col).type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
            raise SourceError(f"source {source.name}: column {id_col!r} (columns.id) must be string or integer, got {id_type}")
    for role in ("width", "height"):
        col = wanted[role]
        if col is not None and not pa.types.is_integer(schema.field(col).type) and not pa.types.is_floating(schema.field(col).type):
            raise SourceError(f"source {source.name}: column {col!r} (columns.{role}) must be numeric, got {schema.field(col).type}")
    if cols.image is not None:
        image_column_kind(source.name, schema, cols.image)
    return schema, id_col


def _images_by_stem(source: ParquetSource) -> dict[str, str]:
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
    return by_stem


def scan(source: ParquetSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    """Every record of the source, file by file."""
    for path in files(source):
        yield from scan_file(source, path, stats, max_caption_chars)


def scan_file(source: ParquetSource, path: str, stats: ScanStats, max_caption_chars: int, start: int = 0,
              stop: int | None = None) -> Iterator[RawRecord]:
    """The records of rows [start, stop) of one of the source's parquet files (all by default).

    With columns.image a record's image is (this file, the image column, its row): `location`,
    `member` and `offset`, read back by sources.read_bytes; the scan hands its bytes to the probe
    as `data`, so the file is read once, in order."""
    cols = source.columns
    _schema, id_col = _check_schema(source, path)
    by_stem = _images_by_stem(source) if source.image_dir is not None else None
    image = cols.image
    batch = IMAGE_BATCH if image is not None else 4096
    for row, values in read_rows(source.name, path, None, start, stop, batch):
        raw_image = values.pop(image) if image is not None else None
        hint = None
        if isinstance(raw_image, dict):  # the Image feature's struct: the path stays in the metadata
            hint = raw_image.get("path")
            values[image] = {"path": hint}
            raw_image = raw_image.get("bytes")
        raw_id = values[id_col] if id_col is not None else row_id(path, row)
        if raw_id is None:
            yield missing_id(source.name, path, row, values)
            continue
        image_id = str(raw_id)
        rec = RawRecord(image_id=image_id, source=source.name, location=None, meta=values)
        if by_stem is not None:
            fname = by_stem.get(image_id)
            if fname is None:
                rec.issue = "missing_file"
                rec.issue_detail = f"no {image_id}.{{{','.join(extensions(source))}}} in {source.image_dir}"
            else:
                rec.location = os.path.join(source.image_dir, fname)
        elif not raw_image:
            rec.issue = "missing_image"
            rec.issue_detail = f"{path}: row {row}: column {image!r} is {'null' if raw_image is None else 'empty'}"
        else:
            rec.location, rec.member, rec.offset, rec.size = path, image, row, len(raw_image)
            rec.data, rec.hint = raw_image, hint
        fill_from_columns(rec, values.__getitem__, cols, max_caption_chars)
        yield rec


def read_rows(source_name: str, path: str, columns: list[str] | None, start: int = 0,
              stop: int | None = None, batch_size: int = 4096) -> Iterator[tuple[int, dict]]:
    """row_range of a parquet file, with a file that fails to decode part way named as the
    source's error (one line), not a traceback."""
    try:
        yield from row_range(open_streaming(path), columns, start, stop, batch_size)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise SourceError(f"source {source_name}: cannot read parquet {path}: {exc}") from None


def fill_from_columns(rec: RawRecord, value, cols: ParquetColumns, max_caption_chars: int) -> None:
    """Set a record's caption (with the fallback column where it is empty), original size, url,
    license, similarity and NSFW tag from its row; `value(column)` reads the row."""
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
    if getattr(cols, "similarity", None):  # folder metadata columns have none
        rec.similarity = value(cols.similarity)  # checked by sources.finalize
    if getattr(cols, "nsfw", None):
        rec.nsfw = _text(value(cols.nsfw))


class _ImageReader:
    """A worker's reader of images embedded in parquet: the files it has open (their footers
    parsed once) and a cursor into the row group it reads. Render tasks come in (file, row)
    order, so the cursor moves forward through each group's batches (a row behind it restarts
    the group), and memory is a page and a batch of one group's column, never a file."""

    MAX_OPEN = 8
    BATCH = 16  # rows per batch of image bytes

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, pq.ParquetFile, list[int]]] = {}
        self.cursor: tuple[tuple, Iterator, int, pa.Array | None] | None = None  # key, batches, first row, batch

    def _file(self, path: str) -> tuple[str, pq.ParquetFile, list[int]]:
        from bucket_assets.core.sources import open_regular

        token = stat_token(path)
        got = self.files.get(path)
        if got is not None and got[0] == token:
            return got
        if got is not None or len(self.files) >= self.MAX_OPEN:
            self.close()
        pf = open_streaming(open_regular(path))
        starts, n = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(n)
            n += pf.metadata.row_group(g).num_rows
        starts.append(n)
        self.files[path] = got = (token, pf, starts)
        return got

    def read(self, path: str, column: str, row: int, size: int | None) -> bytes:
        token, pf, starts = self._file(path)
        if not 0 <= row < starts[-1]:
            raise OSError(f"{path}: row {row} is beyond its {starts[-1]} rows")
        g = bisect.bisect_right(starts, row) - 1
        key = (path, token, column, g)
        if self.cursor is None or self.cursor[0] != key or row < self.cursor[2]:
            self.cursor = None  # let go of the last group before reading the next
            batches = pf.iter_batches(batch_size=self.BATCH, row_groups=[g], columns=[column], use_threads=False)
            self.cursor = (key, batches, starts[g], None)
        key, batches, first, batch = self.cursor
        while batch is None or row >= first + len(batch):
            if batch is not None:
                first += len(batch)
            col = next(batches).column(0)
            batch = col.field("bytes") if pa.types.is_struct(col.type) else col
            self.cursor = (key, batches, first, batch)
        value = batch[row - first].as_py()
        if not value:
            raise OSError(f"{path}: row {row}: column {column!r} holds no image now")
        if size is not None and len(value) != size:
            raise OSError(f"{path}: row {row}: column {column!r} holds {len(value)} bytes, not the {size} scanned")
        return value

    def close(self) -> None:
        self.cursor = None
        for _token, pf, _starts in self.files.values():
            try:
                pf.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.files.clear()


_READER = _ImageReader()


def read_image(path: str, column: str, row: int, size: int | None) -> bytes:
    """The image bytes of one row of a parquet file's image column (sources.read_bytes)."""
    try:
        return _READER.read(path, column, row, size)
    except OSError:
        raise
    except (ValueError, KeyError, IndexError, StopIteration, pa.ArrowException) as exc:
        _READER.close()
        raise OSError(f"{path}: cannot read row {row} of column {column!r}: {exc}") from None
