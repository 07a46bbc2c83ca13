"""LAION / img2dataset-style WebDataset tar shards: <key>.jpg + <key>.txt + <key>.json.

Tars from the web are often damaged: 0-byte or cut by an interrupted download, a header
overwritten, a size field claiming 64 GiB. The reader keeps every member it can find, resumes
after a damaged header at the next valid one (uncompressed tars), and counts what it skipped;
a whole tar it cannot read is a per-file reason, never an error that stops the scan.

img2dataset writes, beside each `<shard>.tar`, a `<shard>.parquet` with one row per URL of the
shard, failed ones included (`key`, `status`, `error_message`, the input and additional
columns, sizes). Where the source reads it (`read_shard_parquet`), a tar sample takes its row as
metadata under the tar's .json (the .json wins where both have a key), and every row without a
sample becomes a record of its own: `failed_to_download` -> download_failed,
`failed_to_resize` -> decode_error (img2dataset's error_message as the detail), a `success`
row whose image is not in the tar -> missing_image. The parquet is read whole for its one tar
(an img2dataset shard is ~10k rows; rows are looked up by key, since img2dataset writes both
files in download-completion order).
"""

from __future__ import annotations

import io
import lzma
import os
import posixpath
import tarfile
import zlib
from typing import BinaryIO, Iterator

import pyarrow.parquet as pq

from bucket_assets.core.captions import clean_caption
from bucket_assets.core.sources import (
    RawRecord, ScanStats, caption_from_sidecar, check_input_file, matching_files, open_regular, stat_token,
)
from bucket_assets.core.sources.values import caption_bytes_limit, load_json_object, read_prefix
from bucket_assets.core.sources.values import text as as_text
from bucket_assets.spec import WebDatasetSource

# A .json sidecar larger than this is not parsed; its record is skipped as json_too_large
# (its similarity and NSFW tag are unknown, so it must not pass the filters by default).
MAX_JSON_SIDECAR = 32 << 20
# What reading a damaged (possibly compressed) tar can raise: a cut gzip stream is an EOFError;
# a header whose size field is huge can make tarfile ask for that many bytes.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, MemoryError, ValueError,
               OverflowError)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_BLOCK = 512


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _safe(member: tarfile.TarInfo) -> bool:
    name = member.name
    if not member.isfile():
        return False
    if name.startswith("/") or "\\" in name:
        return False
    return ".." not in name.split("/")


def _get(meta: dict, *keys: str):
    for k in keys:
        if k in meta and meta[k] is not None:
            return meta[k]
    return None


class _Clamped(io.RawIOBase):
    """A file whose reads never ask for more than is left: tarfile reads a GNU long name or
    PAX header of the size its header claims, and a claim of 64 GiB would allocate that much."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()


def unit_paths(source: WebDatasetSource) -> list[str]:
    """The source's tars, in the order they are read: each one is a scan unit."""
    return matching_files(source.paths)


_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


def shard_parquet_path(path: str) -> str:
    """img2dataset's per-shard parquet of a tar: <shard>.parquet beside <shard>.tar."""
    d, base = os.path.split(path)
    for suffix in _TAR_SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return os.path.join(d, base[: -len(suffix)] + ".parquet")
    return os.path.join(d, os.path.splitext(base)[0] + ".parquet")


def fingerprint(source: WebDatasetSource, path: str) -> str:
    """The tar's lstat, then (unless read_shard_parquet is false) its shard parquet's, or the
    error lstat gave: adding, changing or removing the parquet rescans the tar. Opens nothing.
    The tar's part comes first: a worker checks it before and after its scan."""
    if source.read_shard_parquet is False:
        return stat_token(path)
    return f"{stat_token(path)}|{stat_token(shard_parquet_path(path))}"


def scan_file(source: WebDatasetSource, path: str, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    """The records of one tar and of its shard parquet's rows; a tar (or parquet) that cannot
    be read at all is a per-file reason in `stats`. The parquet's rows are records even when
    the tar cannot be read: its successes are then missing_image."""
    exts = {e.lower().lstrip(".") for e in source.image_extensions}
    shard = _read_shard(source, path, stats) if source.read_shard_parquet is not False else None
    if check_input_file(path, stats, source.name):
        yield from _scan_tar(path, source, exts, stats, max_caption_chars, shard)
    elif shard is not None:
        yield from _shard_only(path, source, shard, max_caption_chars)


def scan(source: WebDatasetSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    for path in unit_paths(source):
        yield from scan_file(source, path, stats, max_caption_chars)


def _valid_header(buf: bytes) -> bool:
    if len(buf) != _BLOCK or buf[257:262] != b"ustar":
        return False
    try:
        tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def _resync(f: BinaryIO, start: int, size: int) -> int | None:
    """Offset of the next valid USTAR/GNU header at or after `start` (byte granularity, so a
    shifted remainder is found too), or None."""
    chunk = 1 << 20
    pos = start
    while pos < size:
        f.seek(pos)
        data = f.read(chunk + _BLOCK)
        i = data.find(b"ustar", 257)
        while i != -1:
            cand = pos + i - 257
            if cand >= start:
                f.seek(cand)
                if _valid_header(f.read(_BLOCK)):
                    return cand
            i = data.find(b"ustar", i + 1)
        pos += chunk
    return None


def _clean_end(f: BinaryIO, pos: int, size: int) -> bool:
    """The archive ends at `pos`: end of file, or zero blocks."""
    if pos >= size:
        return pos == size
    f.seek(pos)
    rest = f.read(2 * _BLOCK)
    return len(rest) >= _BLOCK and not rest.strip(b"\0")


def _members(path: str, stats: ScanStats, source_name: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    try:
        raw = open_regular(path)
        size = os.fstat(raw.fileno()).st_size
    except OSError as exc:  # permissions, or replaced since it was checked
        stats.add_file("unreadable_file", f"source {source_name}: {path}: {exc.strerror or exc}")
        return
    try:
        compressed = raw.read(6).startswith(_COMPRESSED_MAGIC)
        raw.seek(0)
        f = raw if compressed else _Clamped(raw, size)
        try:
            tf = tarfile.open(fileobj=f, mode="r:*")  # type: ignore[arg-type]
        except _TAR_ERRORS as exc:
            stats.add_file("unreadable_tar", f"source {source_name}: cannot open tar {path}: {_first_line(exc)}")
            return
        while True:
            try:
                m = tf.next()
                err = None
            except _TAR_ERRORS as exc:
                m, err = None, exc
            if m is not None:
                yield tf, m
                continue
            if compressed:
                if err is not None:
                    stats.add("truncated_tar")
                    stats.note(f"source {source_name}: {path}: {_first_line(err)}")
                return
            pos = tf.offset
            if err is None and _clean_end(raw, pos, size):
                return
            resume = _resync(raw, pos + 1, size) if pos < size else None
            if resume is None:
                stats.add("truncated_tar")
                stats.note(f"source {source_name}: {path}: cut at byte {min(pos, size)} of {size}")
                return
            # A damaged header: what lies between here and the next valid header is lost; the
            # rest of the tar is read on.
            stats.add("damaged_tar_region")
            stats.note(f"source {source_name}: {path}: damaged header at byte {pos}, resumed at {resume}")
            tf.offset = resume
            raw.seek(resume)
            tf._loaded = False  # noqa: SLF001 - next() set it at the damaged header
    finally:
        raw.close()


def _first_line(exc: BaseException) -> str:
    s = str(exc)
    return s.splitlines()[0] if s else type(exc).__name__


class _Shard:
    """One shard parquet's rows: key -> (row number, row) in file order, the rows without a key,
    and the rows that repeat a key (both kept as records)."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[str, tuple[int, dict]] = {}
        self.unkeyed: list[tuple[int, dict]] = []
        self.repeated: list[tuple[int, str, dict]] = []


# img2dataset's status of a row without an image in the tar -> its reason.
_FAILED = {"failed_to_download": "download_failed", "failed_to_resize": "decode_error"}
SHARD_BATCH = 4096


def _read_shard(source: WebDatasetSource, tar: str, stats: ScanStats) -> _Shard | None:
    """The tar's shard parquet, or None: absent (counted as missing_shard_parquet when the
    source says read_shard_parquet: true), or not readable (a per-file reason; the tar is still
    read, from itself alone)."""
    path = shard_parquet_path(tar)
    try:
        os.lstat(path)
    except FileNotFoundError:
        if source.read_shard_parquet is True:
            stats.add_file("missing_shard_parquet",
                           f"source {source.name}: {tar} has no shard parquet {path} (read_shard_parquet: true)")
        return None
    except OSError:
        pass  # check_input_file names it
    if not check_input_file(path, stats, source.name):
        return None
    shard = _Shard(path)
    try:
        with open_regular(path) as f, pq.ParquetFile(f) as pf:
            names = pf.schema_arrow.names
            missing = [c for c in ("key", "status") if c not in names]
            if missing:
                raise ValueError(f"no column {', '.join(map(repr, missing))} (not an img2dataset shard parquet)")
            i = 0
            for batch in pf.iter_batches(batch_size=SHARD_BATCH):
                for row in batch.to_pylist():
                    key = row.get("key")
                    key = None if key is None else as_text(key)[0]
                    if not key:
                        shard.unkeyed.append((i, row))
                    elif key in shard.rows:
                        shard.repeated.append((i, key, row))
                    else:
                        shard.rows[key] = (i, row)
                    i += 1
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        stats.add_file("unreadable_shard_parquet",
                       f"source {source.name}: cannot read shard parquet {path}: {_first_line(exc)}")
        return None
    return shard


def _apply_meta(rec: RawRecord, meta: dict, max_chars: int, caption_field: str) -> None:
    """The standard fields from a record's metadata (the tar .json over its parquet row)."""
    rec.meta = meta
    rec.url = _get(meta, "url", "URL")
    rec.similarity = _get(meta, "similarity", "SIMILARITY")
    rec.nsfw = _get(meta, "NSFW", "nsfw")
    rec.license = _get(meta, "LICENSE", "license")
    rec.orig_w = _get(meta, "original_width", "WIDTH", "width")
    rec.orig_h = _get(meta, "original_height", "HEIGHT", "height")
    caption = _get(meta, "caption", "TEXT")
    if rec.caption is None and isinstance(caption, str):
        rec.caption, flags = clean_caption(caption, max_chars)
        rec.caption_field = caption_field
        rec.notes.extend(flags)


def _shard_only(tar: str, source: WebDatasetSource, shard: _Shard, max_chars: int) -> Iterator[RawRecord]:
    """Records for the shard parquet's rows that no tar sample took, in file order."""
    from bucket_assets.core.sources.parquet import missing_id

    left: list[tuple[int, str | None, dict]] = [(i, k, r) for k, (i, r) in shard.rows.items()]
    left += [(i, None, r) for i, r in shard.unkeyed]
    left += shard.repeated
    left.sort(key=lambda t: t[0])
    repeated = {i for i, _k, _r in shard.repeated}
    for i, key, row in left:
        if key is None:
            rec = missing_id(source.name, shard.path, i, row)
            rec.issue_detail = f"{shard.path}: row {i} has a null key"
        else:
            rec = RawRecord(image_id=key, source=source.name, location=tar, meta=row)
            status = as_text(row.get("status"))[0]
            message = as_text(row.get("error_message"))[0]
            if i in repeated:
                rec.issue = "duplicate_id"
                rec.issue_detail = f"{shard.path}: row {i} repeats key {key}"
            elif status in _FAILED:
                rec.issue = _FAILED[status]
                rec.issue_detail = message or f"img2dataset status {status}"
            else:
                rec.issue = "missing_image"
                rec.issue_detail = (f"{tar}: key {key} has no image in the tar "
                                    f"(status {status or 'null'} in {os.path.basename(shard.path)})")
        _apply_meta(rec, row, max_chars, "parquet.caption")
        yield rec


def _scan_tar(path, source, exts, stats, max_chars, shard: _Shard | None = None) -> Iterator[RawRecord]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    sidecars: dict[tuple[str, str], tuple[bytes, bool]] = {}
    txt_limit = caption_bytes_limit(max_chars)
    for tf, m in _members(path, stats, source.name):
        if not _safe(m):
            stats.add("unsafe_tar_member")
            continue
        key, ext = _split_key(m.name)
        if not key or not ext:
            stats.add("unkeyed_tar_member")
            continue
        parts = samples.get(key)
        if parts is None:
            parts = samples[key] = {}
            order.append(key)
        if ext in parts:
            # The same key twice: the first is the sample, the second is counted.
            stats.add("duplicate_tar_member")
            continue
        parts[ext] = m
        if ext in ("txt", "json"):
            limit = txt_limit if ext == "txt" else MAX_JSON_SIDECAR
            if ext == "json" and m.size > limit:
                sidecars[(key, ext)] = (b"", True)
                continue
            try:
                fobj = tf.extractfile(m)
                sidecars[(key, ext)] = read_prefix(fobj, limit) if fobj else (b"", False)
            except _TAR_ERRORS:
                sidecars[(key, ext)] = (b"", True) if ext == "json" else (b"", False)
    for key in order:
        parts = samples[key]
        # "a.key.jpg" is field "key.jpg" of key "a": an image by its last suffix, as webdataset decodes it.
        image_exts = sorted(e for e in parts if e.rsplit(".", 1)[-1] in exts)
        rec = RawRecord(image_id=key, source=source.name, location=path)
        if not image_exts:
            rec.issue = "missing_image"
            rec.issue_detail = f"{path}: key {key} has no image member (has {', '.join(sorted(parts))})"
        else:
            if len(image_exts) > 1:
                stats.add("extra_image_member", len(image_exts) - 1)
            m = parts[image_exts[0]]
            rec.member = m.name
            rec.size = m.size
            rec.offset = m.offset_data  # in the decompressed stream for a compressed tar
        txt = sidecars.get((key, "txt"))
        if txt is not None:
            rec.caption, flags = caption_from_sidecar(txt[0], txt[1], max_chars)
            rec.caption_field = "txt"
            rec.notes.extend(flags)
        raw_json = sidecars.get((key, "json"))
        meta = None
        if raw_json is not None:
            data, too_large = raw_json
            if too_large:
                rec.issue = rec.issue or "json_too_large"
                rec.issue_detail = rec.issue_detail or (
                    f"{path}: {key}.json is over {MAX_JSON_SIDECAR >> 20} MiB or unreadable; its filters cannot be applied")
            else:
                meta, flags = load_json_object(data)
                rec.notes.extend(sorted(flags))
            meta = meta or {}
            _apply_meta(rec, meta, max_chars, "json.caption")
        row = shard.rows.pop(key, None) if shard is not None else None
        if row is not None:
            row = row[1]
            if as_text(row.get("status"))[0] != "success":
                rec.notes.append("shard_status_mismatch")  # a sample img2dataset says it did not write
            # The tar's .json wins where both have a key; the row fills in the rest (a caption
            # only where neither the .txt nor the .json gave one).
            _apply_meta(rec, row if meta is None else {**row, **meta}, max_chars, "parquet.caption")
        yield rec
    if shard is not None:
        yield from _shard_only(path, source, shard, max_chars)
