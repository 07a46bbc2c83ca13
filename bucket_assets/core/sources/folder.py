"""A plain folder of images with optional sidecar captions `<stem>.txt` and optional Hugging Face
imagefolder metadata (`metadata.jsonl` / `metadata.csv`).

Scan units, in os.walk's top-down order (subdirectories sorted, links not followed):

- each directory with image files; its records are its image files in sorted name order;
- each metadata file, right after the last directory below it; its records are the rows that
  describe no image of the walk, each with its reason (missing_file, unsafe_path, ...).

Imagefolder metadata. A directory may hold `metadata.jsonl` (one JSON object per line) or
`metadata.csv` (a header row, then one row per image), not both: both in one directory is a
source error (one line), since which one is meant cannot be guessed. A row names its image by
`file_name`, a relative path from the metadata file's directory (`a.jpg`, `sub/b.jpg`; no `..`,
not absolute). An image takes its row from the nearest metadata file in its own directory or
above it, within the source (the convention's rule), so a subdirectory's own metadata file
replaces its parent's for the images below it; a parent's row pointing there is
`metadata_shadowed`. The row's `columns.caption` column (default `text`) is the caption, then
`columns.fallback_caption` where that is empty, then the sidecar `.txt`; an image without a row
uses its sidecar as before. Every column but `file_name` is the record's source metadata (what
`filters.columns` rules read). A second row for one file name is its own record,
`duplicate_id` (the first row in file order is used). Malformed rows (not JSON, not an object,
no `file_name`, a CSV row with the wrong number of fields, a line over MAX_ROW_BYTES) are
`metadata_invalid` records named `<metadata file>:<line>`; what cannot be read past (a CSV
quoting error, a CSV header without `file_name`) is a source error naming the line. Text that is
not UTF-8 is kept with surrogate escapes: a file name still matches the file it names (which the
index then calls name_not_utf8, as any such file) and a caption or value is repaired and flagged.

Memory: a metadata file maps names to rows, and a directory is scanned in parts of at most
PART_RECORDS images. A part streams the governing metadata file once and keeps only the line
numbers and byte offsets of the rows of its own images (so memory is bounded by the part, not
by the file or its rows' sizes), then re-reads just those rows by offset, in name order. The
metadata unit streams the file once, one row at a time, and checks each row's target with lstat.
The cost is a pass over the metadata file per part, as the parquet source lists its image dir
per part; a collection of millions of rows is better served as a parquet source.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import posixpath
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from bucket_assets.core.sources import (
    RawRecord, ScanStats, caption_from_sidecar, dir_state, is_candidate, open_regular, stat_token,
)
from bucket_assets.core.sources.parquet import SourceError, fill_from_columns
from bucket_assets.core.sources.values import caption_bytes_limit, is_regular_file, read_prefix
from bucket_assets.spec import FolderSource

METADATA_JSONL, METADATA_CSV = "metadata.jsonl", "metadata.csv"
METADATA_NAMES = (METADATA_JSONL, METADATA_CSV)
MAX_ROW_BYTES = 64 << 20  # a longer metadata line is metadata_invalid (jsonl) or a source error (csv)
_PLACE_CACHE = 4096  # directories whose verdict a metadata unit remembers (cleared when full)


def extensions(source: FolderSource) -> set[str]:
    return {e.lower().lstrip(".") for e in source.image_extensions}


def _root(source: FolderSource) -> str:
    return os.fspath(Path(source.path))


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def metadata_in(source: FolderSource, d: str) -> str | None:
    """The metadata file of directory `d`, from lstat alone (never opened). Anything by that name
    that is not a directory counts, so a symlink or FIFO there is reported (its unit names it)
    rather than silently read as "no metadata"."""
    found = []
    for n in METADATA_NAMES:
        p = os.path.join(d, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            found.append(p)
    if len(found) > 1:
        raise SourceError(f"source {source.name}: {d} holds both {METADATA_JSONL} and {METADATA_CSV}; "
                          "keep one (one metadata file per directory)")
    return found[0] if found else None


def governing_metadata(source: FolderSource, d: str) -> str | None:
    """The nearest metadata file at or above directory `d`, within the source."""
    root, cur = _root(source), d
    while True:
        m = metadata_in(source, cur)
        if m is not None or cur == root:
            return m
        parent = os.path.dirname(cur)
        if parent == cur or not (parent == root or parent.startswith(root.rstrip(os.sep) + os.sep)):
            return None
        cur = parent


def units(source: FolderSource) -> Iterator[tuple[str, str, int | None]]:
    """(unit, fingerprint, records when known) in reading order, from listings and lstat alone.

    A directory with images: its entries' names and lstat (which covers its own metadata file
    and sidecars), plus the path and lstat of the metadata file that governs it from above. A
    metadata file, after its subtree: its lstat plus the listing of every directory of its
    subtree (whether a row's image exists, or another metadata file shadows it, is decided there).
    Only the pending subdirectories and the open metadata files above the current directory are
    held."""
    exts = extensions(source)
    root = _root(source)
    # (dir, governing metadata, its token), or (None, open entry) closing a metadata file's subtree.
    stack: list[tuple] = [(root, None, None)]
    open_: list[list] = []  # [metadata path, its lstat token, sha256 over its subtree's listings]
    while stack:
        d, gov, gov_token = stack.pop()
        if d is None:
            entry = gov
            open_.remove(entry)
            yield entry[0], f"{entry[1]}|{entry[2].hexdigest()}", None
            continue
        state = dir_state(d, exts, subdirs=True)
        own = metadata_in(source, d)
        if own is not None:
            gov, gov_token = own, stat_token(own)
            entry = [own, gov_token, hashlib.sha256()]
            open_.append(entry)
            stack.append((None, entry, None))
        rel = os.fsencode(os.path.relpath(d, root))
        for entry in open_:
            entry[2].update(rel + b"\0" + state.token.encode() + b"\n")
        if state.candidates:
            yield d, state.token if gov is None else f"{state.token}|{gov}:{gov_token}", state.candidates
        stack.extend((os.path.join(d, name), gov, gov_token) for name in reversed(state.subdirs))


def is_metadata_unit(unit: str) -> bool:
    return os.path.basename(unit) in METADATA_NAMES and not _is_real_dir(unit)


def _files(dirpath: str) -> list[str]:
    """os.walk's non-directory names of one directory (nothing if it cannot be listed)."""
    names = []
    try:
        with os.scandir(dirpath) as it:
            for e in it:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    names.append(e.name)
    except OSError:
        return []
    return names


# Reading metadata files ----------------------------------------------------------------------

def _lines(f: BinaryIO, first: int = 1) -> Iterator[tuple[int, int, int, bytes, bool]]:
    """(line number, byte offset, end offset, bytes, too long) of each line from the file's
    position; a line over MAX_ROW_BYTES is passed over in bounded reads, and only its first bytes
    are returned; a UTF-8 byte order mark opening the file is dropped."""
    n, off = first - 1, f.tell()
    while True:
        line = f.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        n += 1
        start, off = off, off + len(line)
        long = len(line) > MAX_ROW_BYTES
        if long and not line.endswith(b"\n"):
            while True:
                more = f.readline(1 << 20)
                off += len(more)
                if not more or more.endswith(b"\n"):
                    break
        if start == 0 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        yield n, start, off, line, long


def _text(line: bytes) -> str:
    # Surrogate escapes keep bytes that are not UTF-8: a file name then still equals the name the
    # directory listing gives, and sources.finalize repairs and flags captions and values.
    return line.decode("utf-8", errors="surrogateescape")


def _json_row(line: bytes) -> tuple[dict | None, str | None]:
    try:
        row = json.loads(_text(line))
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at column {exc.colno})"
    except (ValueError, RecursionError) as exc:  # integer digit limits; nesting past the parser's
        return None, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})"
    if not isinstance(row, dict):
        return None, f"not a JSON object (a {type(row).__name__})"
    return row, None


class _Csv:
    """A metadata.csv read as (line, offset, row) with its header, records located by byte offset."""

    def __init__(self, source: FolderSource, path: str, f: BinaryIO):
        self.source, self.path, self.f = source, path, f
        csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))  # process-wide; only relaxes
        self.line, self.end = 0, 0
        self.header: list[str] | None = None
        self._reader = csv.reader(self._feed(), strict=True)
        header = self._next()
        if header is None:
            return
        if "file_name" not in header:
            raise SourceError(f"source {source.name}: {path} line 1: the header has no file_name column "
                              f"(it has {', '.join(repr(h) for h in header[:20])})")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise SourceError(f"source {source.name}: {path} line 1: the header names {dup[0]!r} twice")
        self.header = header

    def _feed(self) -> Iterator[str]:
        for n, _start, end, line, long in _lines(self.f, self.line + 1):
            if long:
                raise SourceError(f"source {self.source.name}: {self.path} line {n} is longer than "
                                  f"{MAX_ROW_BYTES >> 20} MiB")
            self.line, self.end = n, end
            yield _text(line)

    def _next(self) -> list[str] | None:
        # strict: a stray quote or an unterminated quoted field is an error, not a field that
        # silently swallows the following rows.
        start = self.line + 1
        try:
            return next(self._reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            where = f"line {start}" if self.line <= start else f"the row starting on line {start} (read to line {self.line})"
            raise SourceError(f"source {self.source.name}: {self.path} {where}: not valid CSV ({exc})") from None

    def rows(self) -> Iterator[tuple[int, int, dict | None, str | None]]:
        if self.header is None:
            return
        while True:
            start_line, start = self.line + 1, self.end
            fields = self._next()
            if fields is None:
                return
            if not fields:  # a blank line
                continue
            yield (start_line, start) + self._row(fields)

    def _row(self, fields: list[str]) -> tuple[dict | None, str | None]:
        if len(fields) != len(self.header):
            return None, f"{len(fields)} fields, the header has {len(self.header)}"
        return dict(zip(self.header, fields)), None

    def row_at(self, line: int, offset: int) -> dict | None:
        self.f.seek(offset)
        self.line, self.end = line - 1, offset
        self._reader = csv.reader(self._feed(), strict=True)
        fields = self._next()
        return None if fields is None else self._row(fields)[0]


class MetadataFile:
    """One open metadata file: its rows streamed in order (line, byte offset, row or None, why not),
    and a row read again by its offset."""

    def __init__(self, source: FolderSource, path: str, f: BinaryIO):
        self.path, self.f = path, f
        self._csv = _Csv(source, path, f) if os.path.basename(path) == METADATA_CSV else None

    def rows(self) -> Iterator[tuple[int, int, dict | None, str | None]]:
        if self._csv is not None:
            yield from self._csv.rows()
            return
        for n, off, _end, line, long in _lines(self.f):
            if long:
                yield n, off, None, f"the line is longer than {MAX_ROW_BYTES >> 20} MiB"
                continue
            if not line.strip():
                continue
            row, why = _json_row(line)
            yield n, off, row, why

    def row_at(self, line: int, offset: int) -> dict | None:
        if self._csv is not None:
            return self._csv.row_at(line, offset)
        self.f.seek(offset)
        return _json_row(next(_lines(self.f, line), (0, 0, 0, b"", False))[3])[0]


def open_metadata(source: FolderSource, path: str) -> tuple[MetadataFile | None, str | None, str | None]:
    """(the file, None, None), or (None, reason, detail) for one that cannot be read (a symlink,
    FIFO, device, unreadable file): its images then fall back to their sidecars, and its unit
    counts it under the reason."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return None, "unreadable_file", f"source {source.name}: {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return None, "symlink", f"source {source.name}: {path} is a symlink (links are not followed)"
    if not stat.S_ISREG(st.st_mode):
        return None, "not_a_file", f"source {source.name}: {path} is not a regular file"
    try:
        f = open_regular(path)
    except OSError as exc:
        return None, "unreadable_file", f"source {source.name}: {path}: {exc.strerror or exc}"
    try:
        return MetadataFile(source, path, f), None, None
    except BaseException:
        f.close()
        raise


def clean_file_name(value: object) -> tuple[str | None, str, str]:
    """A row's file_name as a normalized relative POSIX path, or (None, reason, why)."""
    if not isinstance(value, str) or not value:
        return None, "metadata_invalid", "file_name is missing, empty or not a string"
    if "\0" in value:
        return None, "unsafe_path", "file_name holds a NUL character"
    if value.startswith("/"):
        return None, "unsafe_path", f"file_name {value!r} is absolute (it must be relative to the metadata file's folder)"
    if ".." in value.split("/"):
        return None, "unsafe_path", f"file_name {value!r} has a '..' component (it must stay inside the metadata file's folder)"
    norm = posixpath.normpath(value)
    if norm == ".":
        return None, "metadata_invalid", f"file_name {value!r} names no file"
    return norm, "", ""


def _meta(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "file_name"}


def _rel(path: str, start: str) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


# Scanning ------------------------------------------------------------------------------------

def scan_dir(source: FolderSource, dirpath: str, stats: ScanStats, max_caption_chars: int, start: int = 0,
             stop: int | None = None) -> Iterator[RawRecord]:
    """The records of one unit: a directory's image files in sorted order, [start:stop) of them
    (each followed by a duplicate_id record per further metadata row naming it), or a metadata
    file's rows that describe no image."""
    if is_metadata_unit(dirpath):
        yield from scan_metadata(source, dirpath, stats, max_caption_chars)
        return
    exts = extensions(source)
    root = Path(source.path)
    names = sorted(n for n in _files(dirpath) if is_candidate(n, exts) and n not in METADATA_NAMES)[start:stop]
    gov = governing_metadata(source, dirpath) if names else None
    md = open_metadata(source, gov)[0] if gov is not None else None
    try:
        found: dict[str, tuple[int, int]] = {}  # file name -> (line, offset) of its first row
        dups: dict[str, list[int]] = {}
        if md is not None:
            rel_dir = _rel(dirpath, os.path.dirname(gov))
            keys = {(n if rel_dir == "." else f"{rel_dir}/{n}"): n for n in names}
            for line, offset, row, _why in md.rows():
                if row is None:
                    continue
                key = clean_file_name(row.get("file_name"))[0]
                name = keys.get(key) if key is not None else None
                if name is None:
                    continue
                if name in found:
                    dups.setdefault(name, []).append(line)
                else:
                    found[name] = (line, offset)
        for fname in names:
            full = Path(dirpath) / fname
            rel = full.relative_to(root).with_suffix("").as_posix()
            rec = RawRecord(image_id=rel, source=source.name, location=str(full))
            hit = found.get(fname)
            if hit is not None:
                row = md.row_at(*hit) or {}
                rec.meta = _meta(row)
                fill_from_columns(rec, rec.meta.get, source.columns, max_caption_chars)
            if not is_regular_file(full):
                # A symlink (never followed: it may point outside the source), a FIFO, a device.
                rec.issue = "unsafe_file"
                rec.issue_detail = f"{full}: not a regular file (symlinks, FIFOs and devices are not read)"
            elif not rec.caption:
                _sidecar(rec, full, max_caption_chars)
            yield rec
            if hit is not None:
                shown = _rel(gov, source.path)
                for line in dups.get(fname, ()):
                    yield RawRecord(image_id=rel, source=source.name, location=None, issue="duplicate_id",
                                    issue_detail=f"{shown} line {line}: a second row for {fname!r} "
                                                 f"(the row on line {hit[0]} is used)")
    finally:
        if md is not None:
            md.f.close()


def _sidecar(rec: RawRecord, full: Path, max_caption_chars: int) -> None:
    side = full.with_suffix(".txt")
    if is_regular_file(side):
        try:
            with open_regular(str(side)) as f:
                data, cut = read_prefix(f, caption_bytes_limit(max_caption_chars))
            caption, flags = caption_from_sidecar(data, cut, max_caption_chars)
        except OSError:
            rec.notes.append("caption_unreadable")
            return
        rec.caption, rec.caption_field = caption, "txt"
        rec.notes.extend(flags)


def scan_metadata(source: FolderSource, path: str, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    """The rows of a metadata file that describe no image of the walk, one record each, in file
    order: metadata_invalid, unsafe_path, missing_file, not_an_image, unsafe_file (a directory
    on the way is a link), metadata_shadowed (a nearer metadata file describes that directory).
    Rows whose image exists are the directory parts' records, so none is counted twice."""
    md, reason, detail = open_metadata(source, path)
    if md is None:
        stats.add_file(reason, detail)
        return
    exts = extensions(source)
    base, root = os.path.dirname(path), _root(source)
    shown = _rel(path, root)
    places: dict[str, tuple[str, str] | None] = {}
    try:
        for line, _off, row, why in md.rows():
            rec = RawRecord(image_id=f"{shown}:{line}", source=source.name, location=None)
            if row is None:
                rec.issue, rec.issue_detail = "metadata_invalid", f"{shown} line {line}: {why}"
                yield rec
                continue
            rec.meta = _meta(row)
            fill_from_columns(rec, rec.meta.get, source.columns, max_caption_chars)
            key, reason, why = clean_file_name(row.get("file_name"))
            if key is None:
                rec.issue, rec.issue_detail = reason, f"{shown} line {line}: {why}"
                yield rec
                continue
            target = os.path.join(base, key)
            rec.image_id = Path(_rel(target, root)).with_suffix("").as_posix()
            problem = _place(source, path, base, posixpath.dirname(key), places)
            name = posixpath.basename(key)
            if problem is None and (not is_candidate(name, exts) or name in METADATA_NAMES):
                problem = ("not_an_image", f"{key!r} is not named like an image (image_extensions: "
                                           f"{', '.join(sorted(exts))})")
            if problem is None:
                try:
                    os.lstat(target)
                    if os.path.isdir(target):
                        problem = ("missing_file", f"{key!r} is a directory")
                except OSError:
                    problem = ("missing_file", f"no file {key!r}")
            if problem is not None:
                rec.issue, rec.issue_detail = problem[0], f"{shown} line {line}: {problem[1]}"
                yield rec
    finally:
        md.f.close()


def _place(source: FolderSource, path: str, base: str, sub: str, cache: dict) -> tuple[str, str] | None:
    """Why a row's directory `sub` (relative to the metadata file's directory) holds no image the
    walk gives this metadata file, or None: a component is missing or a link, or a nearer
    metadata file governs it."""
    if sub in cache:
        return cache[sub]
    verdict = None
    cur = base
    parts = [p for p in sub.split("/") if p] if sub else []
    for i, part in enumerate(parts):
        cur = os.path.join(cur, part)
        shown = "/".join(parts[: i + 1])
        try:
            st = os.lstat(cur)
        except OSError:
            verdict = ("missing_file", f"no directory {shown!r}")
            break
        if stat.S_ISLNK(st.st_mode):
            verdict = ("unsafe_file", f"{shown!r} is a symlink (links are not followed)")
            break
        if not stat.S_ISDIR(st.st_mode):
            verdict = ("missing_file", f"{shown!r} is not a directory")
            break
    if verdict is None and parts:
        nearest = governing_metadata(source, cur)
        if nearest != path:
            verdict = ("metadata_shadowed", f"the images of {sub!r} are described by "
                                            f"{_rel(nearest, _root(source))} (the nearest metadata file)")
    if len(cache) >= _PLACE_CACHE:
        cache.clear()
    cache[sub] = verdict
    return verdict


def scan(source: FolderSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    for unit, _fp, _n in units(source):
        yield from scan_dir(source, unit, stats, max_caption_chars)
