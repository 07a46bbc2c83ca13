"""Input sources: each reader turns one spec source into RawRecords without decoding images.

A record says where its image bytes are (file, or tar + data offset) and carries the source's
own caption and metadata. Reading the bytes and probing the header happens later, in parallel.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from bucket_assets.core.sources import values
from bucket_assets.spec import FolderSource, ParquetSource, Source, UrlSource, WebDatasetSource


@dataclass
class RawRecord:
    image_id: str
    source: str
    location: str | None  # image file, or the tar (or parquet file) that holds it
    member: str | None = None  # tar member name (a parquet file: the image column)
    offset: int | None = None  # data offset in an uncompressed tar (a parquet file: the row)
    size: int | None = None
    caption: str | None = None
    caption_field: str | None = None
    url: str | None = None
    similarity: float | None = None
    nsfw: str | None = None
    license: str | None = None
    orig_w: int | None = None  # the source's claimed original size (LAION json, parquet columns)
    orig_h: int | None = None
    meta: dict | None = None  # the source's own metadata record (LAION json, parquet row)
    issue: str | None = None  # a reason known at scan time (missing_file, missing_image, ...)
    issue_detail: str | None = None
    notes: list[str] = field(default_factory=list)  # non-fatal flags (invalid_similarity, ...)
    # Not kept in the index: the image bytes when the scan already holds them (parquet with
    # embedded images), and the row's file-name hint for them.
    data: bytes | None = None
    hint: str | None = None


MAX_NOTES = 200  # detail lines kept per scan (the counts are always complete)


@dataclass
class ScanStats:
    """Things a scan skipped that are not records of their own: tar members that are not
    samples (`counts`), and whole source files that could not be read (`files`), with a
    bounded list of detail lines for the log."""

    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def add_file(self, reason: str, detail: str) -> None:
        self.files[reason] = self.files.get(reason, 0) + 1
        self.note(detail)

    def note(self, detail: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(values.text(detail)[0] or "")


def stat_token(path: str) -> str:
    """What a scan unit's file looks like without opening it: type, size, mtime and inode from
    lstat (links are never followed), or the error that stat gave."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"error:{exc.errno}"
    return f"{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def matching_files(patterns: Iterable[str]) -> list[str]:
    """Every file the globs match, once each, in sorted order: a source's reading order."""
    return sorted({m for pattern in patterns for m in glob.glob(pattern)})


def is_candidate(name: str, exts: Iterable[str]) -> bool:
    """A file name the folder and parquet readers take for an image: its last suffix is one of `exts`."""
    _stem, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in exts


@dataclass
class DirState:
    token: str  # digest of the names and lstat of the entries (subdirectories excluded)
    candidates: int  # entries that are images by name and not directories (os.walk's files)
    subdirs: list[str]  # real subdirectories, sorted (links to directories are not followed)


def dir_state(path: str, exts: Iterable[str], only_candidates: bool = False, subdirs: bool = False) -> DirState:
    """One directory listing, streamed: an order-independent digest (a sum of per-entry hashes,
    so no list of names is kept) of every entry's name, type, size, mtime and inode, without
    opening any of them. `only_candidates`: only entries named like images count."""
    exts = set(exts)
    total, n, cand, subs = 0, 0, 0, []
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    real_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    real_dir = False
                if real_dir:
                    if subdirs:
                        subs.append(e.name)
                    continue
                match = is_candidate(e.name, exts)
                if only_candidates and not match:
                    continue
                if match:
                    try:
                        as_dir = e.is_dir()  # os.walk's test: a link to a directory is not a file
                    except OSError:
                        as_dir = False
                    cand += not as_dir
                try:
                    st = e.stat(follow_symlinks=False)
                    what = f"{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
                except OSError:
                    what = "gone"
                h = hashlib.sha256(os.fsencode(e.name) + b"\0" + what.encode()).digest()
                total = (total + int.from_bytes(h[:16], "big")) % (1 << 128)
                n += 1
    except OSError as exc:
        return DirState(f"error:{exc.errno}", 0, [])
    return DirState(f"{n}:{total:032x}", cand, sorted(subs))


def check_input_file(path: str, stats: ScanStats, source_name: str) -> bool:
    """A source file (tar, parquet) is read only if it is a regular file and not a symlink
    (every source kind refuses links; a FIFO would block the scan forever); otherwise the file
    is counted under its reason."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        stats.add_file("unreadable_file", f"source {source_name}: {path}: {exc.strerror or exc}")
        return False
    if stat.S_ISLNK(st.st_mode):
        stats.add_file("symlink", f"source {source_name}: {path} is a symlink (links are not followed)")
        return False
    if not stat.S_ISREG(st.st_mode):
        stats.add_file("not_a_file", f"source {source_name}: {path} is not a regular file")
        return False
    if st.st_size == 0:
        stats.add_file("empty_file", f"source {source_name}: {path} is empty (0 bytes)")
        return False
    return True


def caption_from_sidecar(data: bytes, cut: bool, max_chars: int) -> tuple[str | None, list[str]]:
    """A caption file's text from its first bytes (`cut`: the file was longer)."""
    from bucket_assets.core.captions import clean_caption

    text, replaced = values.decode_prefix(data, cut)
    caption, flags = clean_caption(text, max_chars)
    if replaced:
        flags.insert(0, "caption_not_utf8")
    if cut and "caption_truncated" not in flags:
        flags.append("caption_truncated")
    return caption, flags


def finalize(rec: RawRecord) -> RawRecord:
    """Convert every scanned value to what the raw index can hold (values.*): ids and names
    that are not UTF-8, NaN, infinities, out-of-range sizes and unsafe JSON never reach it."""
    notes = rec.notes
    rec.image_id, bad = values.name(rec.image_id)
    if bad:
        notes.append("name_not_utf8")
    if rec.member is not None:
        rec.member, _ = values.name(rec.member)
    if rec.location is not None:
        loc, bad = values.name(rec.location)
        if bad and rec.member is None:
            # A file whose path is not UTF-8 cannot be named in the index (and read back).
            rec.issue = rec.issue or "name_not_utf8"
            rec.issue_detail = rec.issue_detail or f"{loc}: the file name is not UTF-8"
        rec.location = loc
    rec.caption, bad = values.text(rec.caption)
    if bad and "caption_not_utf8" not in notes:
        notes.append("caption_not_utf8")
    for attr in ("url", "nsfw", "license", "caption_field", "issue_detail"):
        setattr(rec, attr, values.text(getattr(rec, attr))[0])
    bad_size = False
    for attr in ("orig_w", "orig_h"):
        v, bad = values.size(getattr(rec, attr))
        setattr(rec, attr, v)
        bad_size |= bad
    if bad_size:
        notes.append("invalid_size")
    rec.similarity, bad = values.number(rec.similarity)
    if bad:
        notes.append("invalid_similarity")
    if rec.meta is not None:
        meta, flags = values.json_safe(rec.meta)
        rec.meta = meta if isinstance(meta, dict) else {}
        notes.extend(sorted(flags - set(notes)))
    rec.notes = list(dict.fromkeys(notes))
    return rec


def scan_source(source: Source, stats: ScanStats, max_caption_chars: int, downloads: dict[str, dict] | None = None,
                download_store: str | None = None) -> Iterator[RawRecord]:
    """`downloads` (image_id -> url_downloads row) and `download_store` locate a URL source's
    fetched bytes."""
    from bucket_assets.core.sources import folder, parquet, urls, webdataset

    if isinstance(source, WebDatasetSource):
        records = webdataset.scan(source, stats, max_caption_chars)
    elif isinstance(source, ParquetSource):
        records = parquet.scan(source, stats, max_caption_chars)
    elif isinstance(source, FolderSource):
        records = folder.scan(source, stats, max_caption_chars)
    elif isinstance(source, UrlSource):
        records = urls.scan(source, stats, max_caption_chars, downloads or {}, str(download_store))
    else:  # pragma: no cover - the spec's discriminator makes this unreachable
        raise TypeError(f"unknown source kind {source!r}")
    for rec in records:
        yield finalize(rec)


def open_regular(path: str) -> BinaryIO:
    """Open an input for reading, refusing what is not a regular file: a FIFO put where an image
    was would block forever, so the open does not wait and the type is checked on the open file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_PARQUET_MAGIC = b"PAR1"


def read_bytes(location: str, member: str | None, offset: int | None, size: int | None) -> bytes:
    """The image bytes of a record: a plain file, a seek into an uncompressed tar, a tar member,
    or a row of a parquet file's image column (member: the column, offset: the row)."""
    try:
        f = open_regular(location)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{location}: is a symlink (links are not followed)") from None
        raise
    if member is None:
        with f:
            return f.read()
    with f:
        head = f.read(6)
        if head.startswith(_PARQUET_MAGIC) and offset is not None:
            # A parquet file starts and ends with PAR1 (a tar ends with zero blocks, never so).
            f.seek(-4, os.SEEK_END)
            if f.read(4) == _PARQUET_MAGIC:
                from bucket_assets.core.sources.parquet import read_image

                return read_image(location, member, offset, size)
            f.seek(6)
        compressed = head.startswith(_COMPRESSED_MAGIC)
        if offset is not None and size is not None and not compressed:
            total = os.fstat(f.fileno()).st_size
            if offset + size > total:  # never ask for bytes a (cut or lying) tar does not have
                raise OSError(f"{location}: member {member} is truncated ({max(0, total - offset)} of {size} bytes)")
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise OSError(f"{location}: member {member} is truncated ({len(data)} of {size} bytes)")
            return data
    import tarfile

    # A compressed tar is read through: the member is found by name and by its offset in the
    # decompressed stream, since a name can repeat (the scan keeps the first).
    try:
        with tarfile.open(location, "r:*") as tf:
            for m in tf:
                if values.name(m.name)[0] == member and (offset is None or m.offset_data == offset):
                    if not m.isfile():
                        raise OSError(f"{location}: member {member} is not a regular file")
                    return tf.extractfile(m).read()
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile, gzip, bz2 and lzma each raise their own errors
        raise OSError(f"{location}: cannot read member {member}: {type(exc).__name__}: {exc}") from None
    raise OSError(f"{location}: member {member} not found")
