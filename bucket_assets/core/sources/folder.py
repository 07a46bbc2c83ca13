"""A plain folder of images with optional sidecar captions `<stem>.txt`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from bucket_assets.core.sources import RawRecord, ScanStats, caption_from_sidecar, open_regular
from bucket_assets.core.sources.values import caption_bytes_limit, is_regular_file, read_prefix
from bucket_assets.spec import FolderSource


def scan(source: FolderSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    exts = {e.lower().lstrip(".") for e in source.image_extensions}
    root = Path(source.path)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            stem, dot, ext = fname.rpartition(".")
            if not dot or ext.lower() not in exts:
                continue
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
