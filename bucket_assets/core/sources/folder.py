"""A plain folder of images with optional sidecar captions `<stem>.txt`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from bucket_assets.core.captions import clean_caption
from bucket_assets.core.sources import RawRecord, ScanStats
from bucket_assets.spec import FolderSource

_MAX_SIDECAR = 4 << 20


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
            if full.is_symlink() or not full.is_file():
                stats.add("unsafe_file")
                continue
            rel = full.relative_to(root).with_suffix("").as_posix()
            rec = RawRecord(image_id=rel, source=source.name, location=str(full))
            side = full.with_suffix(".txt")
            if side.is_file() and not side.is_symlink():
                raw = side.read_bytes()[:_MAX_SIDECAR]
                rec.caption, flags = clean_caption(raw, max_caption_chars)
                rec.caption_field = "txt"
                rec.notes.extend(flags)
            yield rec
