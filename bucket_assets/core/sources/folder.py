"""A plain folder of images with optional sidecar captions `<stem>.txt`.

Its scan units are its directories, in os.walk's top-down order (subdirectories sorted, links
not followed); a directory's records are its image files in sorted name order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from bucket_assets.core.sources import (
    DirState, RawRecord, ScanStats, caption_from_sidecar, dir_state, is_candidate, open_regular,
)
from bucket_assets.core.sources.values import caption_bytes_limit, is_regular_file, read_prefix
from bucket_assets.spec import FolderSource


def extensions(source: FolderSource) -> set[str]:
    return {e.lower().lstrip(".") for e in source.image_extensions}


def walk_dirs(source: FolderSource) -> Iterator[tuple[str, DirState]]:
    """Every directory of the folder with its state, in the order os.walk(followlinks=False)
    visits them with sorted subdirectories; only the pending subdirectories are held."""
    exts = extensions(source)
    stack = [os.fspath(Path(source.path))]
    while stack:
        d = stack.pop()
        state = dir_state(d, exts, subdirs=True)
        yield d, state
        stack.extend(os.path.join(d, name) for name in reversed(state.subdirs))


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


def scan_dir(source: FolderSource, dirpath: str, stats: ScanStats, max_caption_chars: int, start: int = 0,
             stop: int | None = None) -> Iterator[RawRecord]:
    """The records of one directory: its image files in sorted order, [start:stop) of them."""
    exts = extensions(source)
    root = Path(source.path)
    names = sorted(n for n in _files(dirpath) if is_candidate(n, exts))
    for fname in names[start:stop]:
        full = Path(dirpath) / fname
        rel = full.relative_to(root).with_suffix("").as_posix()
        rec = RawRecord(image_id=rel, source=source.name, location=str(full))
        if not is_regular_file(full):
            # A symlink (never followed: it may point outside the source), a FIFO, a device.
            rec.issue = "unsafe_file"
            rec.issue_detail = f"{full}: not a regular file (symlinks, FIFOs and devices are not read)"
            yield rec
            continue
        side = full.with_suffix(".txt")
        if is_regular_file(side):
            try:
                with open_regular(str(side)) as f:
                    data, cut = read_prefix(f, caption_bytes_limit(max_caption_chars))
                rec.caption, flags = caption_from_sidecar(data, cut, max_caption_chars)
                rec.caption_field = "txt"
                rec.notes.extend(flags)
            except OSError:
                rec.notes.append("caption_unreadable")
        yield rec


def scan(source: FolderSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    for dirpath, _state in walk_dirs(source):
        yield from scan_dir(source, dirpath, stats, max_caption_chars)
