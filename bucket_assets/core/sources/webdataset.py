"""LAION / img2dataset-style WebDataset tar shards: <key>.jpg + <key>.txt + <key>.json."""

from __future__ import annotations

import glob
import json
import lzma
import posixpath
import tarfile
import zlib
from typing import Iterator

from bucket_assets.core.captions import as_float, clean_caption
from bucket_assets.core.sources import RawRecord, ScanStats
from bucket_assets.spec import WebDatasetSource

_MAX_SIDECAR = 4 << 20  # a .txt/.json larger than this is not metadata
# What reading a damaged (possibly compressed) tar can raise: a cut gzip stream is an EOFError.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


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


def _as_int(v) -> int | None:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


def scan(source: WebDatasetSource, stats: ScanStats, max_caption_chars: int) -> Iterator[RawRecord]:
    exts = {e.lower().lstrip(".") for e in source.image_extensions}
    files = sorted({p for pattern in source.paths for p in glob.glob(pattern)})
    for path in files:
        yield from _scan_tar(path, source, exts, stats, max_caption_chars)


def _scan_tar(path, source, exts, stats, max_chars) -> Iterator[RawRecord]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    sidecars: dict[tuple[str, str], bytes] = {}
    try:
        tf = tarfile.open(path, "r:*")
    except _TAR_ERRORS as exc:
        stats.add("unreadable_tar")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OSError(f"source {source.name}: cannot open tar {path}: {first}") from None
    with tf:
        try:
            for m in tf:
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
                    # The same key twice: keep the second as its own sample so it is accounted.
                    stats.add("duplicate_tar_member")
                    continue
                parts[ext] = m
                if ext in ("txt", "json") and m.size <= _MAX_SIDECAR:
                    f = tf.extractfile(m)
                    sidecars[(key, ext)] = f.read() if f else b""
        except _TAR_ERRORS:
            stats.add("truncated_tar")
    for key in order:
        parts = samples[key]
        # "a.key.jpg" is field "key.jpg" of key "a": an image by its last suffix, as webdataset decodes it.
        image_exts = [e for e in parts if e.rsplit(".", 1)[-1] in exts]
        rec = RawRecord(image_id=key, source=source.name, location=path)
        if not image_exts:
            rec.issue = "missing_image"
            rec.issue_detail = f"{path}: key {key} has no image member (has {', '.join(sorted(parts))})"
        else:
            m = parts[sorted(image_exts)[0]]
            rec.member = m.name
            rec.size = m.size
            rec.offset = m.offset_data  # in the decompressed stream for a compressed tar
        txt = sidecars.get((key, "txt"))
        if txt is not None:
            rec.caption, flags = clean_caption(txt, max_chars)
            rec.caption_field = "txt"
            rec.notes.extend(flags)
        raw_json = sidecars.get((key, "json"))
        if raw_json is not None:
            try:
                meta = json.loads(raw_json.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                meta = None
            if not isinstance(meta, dict):
                rec.notes.append("json_not_object")
                meta = {}
            rec.meta = meta
            rec.url = _str(_get(meta, "url", "URL"))
            sim = _get(meta, "similarity", "SIMILARITY")
            rec.similarity, bad = as_float(sim)
            if bad:
                rec.notes.append("invalid_similarity")
            rec.nsfw = _str(_get(meta, "NSFW", "nsfw"))
            rec.license = _str(_get(meta, "LICENSE", "license"))
            rec.orig_w = _as_int(_get(meta, "original_width", "WIDTH", "width"))
            rec.orig_h = _as_int(_get(meta, "original_height", "HEIGHT", "height"))
            if rec.caption is None and isinstance(_get(meta, "caption", "TEXT"), str):
                rec.caption, flags = clean_caption(_get(meta, "caption", "TEXT"), max_chars)
                rec.caption_field = "json.caption"
                rec.notes.extend(flags)
        yield rec


def _str(v) -> str | None:
    return None if v is None else str(v)
