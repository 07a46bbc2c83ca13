"""The processed-image store: each planned sample rendered once to its final JPEG bytes.

Store layout: `<work_dir>/processed/<bucket_id>/<key>.jpg`. Each stored file has a fingerprint
(source bytes, plan, image parameters, code version) recorded in the metadata DB; a rebuild
re-renders only samples whose fingerprint changed or whose file is gone, and re-sharding after
a caption change reads these bytes without decoding or encoding anything.

While a partition renders, each finished sample's row is also appended to the bucket's journal
(`<bucket_id>/.journal.jsonl`), so a run killed half way resumes from what is already stored
instead of rendering the whole bucket again. The journal is dropped once the rows are in the DB.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bucket_assets.core.atomic import atomic_write_bytes
from bucket_assets.core.imaging import (
    ImageError,
    crop,
    decode_rgb,
    encode_jpeg,
    grey_std,
    is_jpeg,
    jpeg_grey_std,
    jpeg_size,
    resize_cover,
    subsampling_for,
)
from bucket_assets.core.sources import read_bytes

RENDER_VERSION = 1  # bump when the pixels for the same inputs change
# Approximate mode decodes at a DCT scale keeping at least this multiple of the resized size, so
# the exact torch resize still does a real antialiased downscale (PSNR vs exact: README).
DCT_MARGIN = 2


@dataclass(frozen=True)
class RenderParams:
    mode: str  # reencode_jpeg | passthrough_jpeg
    quality: int
    subsampling: str
    adaptive_threshold: float
    max_pixels: int
    blank_std: float | None = None  # drop images whose luma std is below this (None: keep all)
    dct_downscale: bool = False  # approximate mode: JPEG DCT-domain downscale before the resize


@dataclass(frozen=True)
class RenderTask:
    image_id: str
    bucket_id: str
    key: str
    source_sha256: str
    location: str
    member: str | None
    data_offset: int | None
    byte_size: int | None
    scale: float
    resized_w: int
    resized_h: int
    crop_left: int
    crop_top: int
    target_w: int
    target_h: int
    out_path: str
    params: RenderParams
    orientation: int | None = None  # EXIF orientation from the raw index, if known

    def fingerprint(self) -> str:
        d = {
            "v": RENDER_VERSION,
            "src": self.source_sha256,
            "plan": [self.resized_w, self.resized_h, self.crop_left, self.crop_top, self.target_w, self.target_h],
            "params": [self.params.mode, self.params.quality, self.params.subsampling, self.params.adaptive_threshold,
                       self.params.blank_std] + ([True] if self.params.dct_downscale else []),
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


JOURNAL_NAME = ".journal.jsonl"


def store_path(processed_dir: str | os.PathLike, bucket_id: str, key: str) -> str:
    return str(Path(processed_dir) / bucket_id / f"{key}.jpg")


def journal_path(processed_dir: str | os.PathLike, bucket_id: str) -> Path:
    return Path(processed_dir) / bucket_id / JOURNAL_NAME


def read_journal(path: str | os.PathLike) -> dict[str, dict]:
    """key -> latest result row journaled for it. A line torn by a kill is ignored."""
    rows: dict[str, dict] = {}
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return rows
    with f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                rows[row["key"]] = row
    return rows


class Journal:
    """Appends result rows to per-bucket journals. Not fsynced: it guards against a killed
    process (the kernel keeps what was written), and a reused row is checked against its file."""

    def __init__(self, processed_dir: str | os.PathLike):
        self.dir = Path(processed_dir)
        self.files: dict[str, object] = {}

    def append(self, row: dict) -> None:
        f = self.files.get(row["bucket_id"])
        if f is None:
            p = journal_path(self.dir, row["bucket_id"])
            p.parent.mkdir(parents=True, exist_ok=True)
            f = self.files[row["bucket_id"]] = open(p, "a", encoding="utf-8")
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def render(task: RenderTask) -> dict:
    """Render one sample to its store path. Returns a result row; never raises for bad images."""
    return _render(task, _no_clock)


def render_profiled(task: RenderTask) -> tuple[dict, dict[str, float]]:
    """render() plus seconds spent per step (read, decode, resize, crop, encode, write)."""
    times: dict[str, float] = {}
    last = [time.perf_counter()]

    def clock(step: str) -> None:
        now = time.perf_counter()
        times[step] = times.get(step, 0.0) + now - last[0]
        last[0] = now

    return _render(task, clock), times


def _no_clock(step: str) -> None:
    pass


def _render(task: RenderTask, clock) -> dict:
    out = {
        "image_id": task.image_id,
        "bucket_id": task.bucket_id,
        "key": task.key,
        "path": task.out_path,
        "fingerprint": task.fingerprint(),
        "status": "ok",
        "error": None,
        "bytes": None,
        "sha256": None,
        "width": None,
        "height": None,
        "subsampling": None,
    }
    try:
        data = read_bytes(task.location, task.member, task.data_offset, task.byte_size)
    except OSError as exc:
        out.update(status="read_error", error=str(exc))
        return out
    clock("read")
    p = task.params
    if p.mode == "passthrough_jpeg":
        if not is_jpeg(data):
            out.update(status="passthrough_not_jpeg", error="source is not a JPEG; passthrough keeps only JPEG bytes")
            return out
        jpg = data
        try:
            std = jpeg_grey_std(data)  # passthrough still proves the bytes decode
        except ImageError as exc:
            out.update(status=exc.reason, error=exc.detail)
            return out
        if p.blank_std is not None and std < p.blank_std:
            out.update(status="blank", error=f"luma std {std:.3f} < {p.blank_std}")
            return out
        w, h = jpeg_size(data)  # the header already parsed in jpeg_grey_std
    else:
        try:
            min_size = (DCT_MARGIN * task.resized_w, DCT_MARGIN * task.resized_h) if p.dct_downscale else None
            rgb = decode_rgb(data, p.max_pixels, task.orientation, min_size)
        except ImageError as exc:
            out.update(status=exc.reason, error=exc.detail)
            return out
        clock("decode")
        rgb = resize_cover(rgb, task.resized_w, task.resized_h)
        clock("resize")
        rgb = crop(rgb, task.crop_left, task.crop_top, task.target_w, task.target_h)
        clock("crop")
        if p.blank_std is not None:
            std = grey_std(rgb)
            if std < p.blank_std:
                out.update(status="blank", error=f"luma std {std:.3f} < {p.blank_std}")
                return out
        sub = subsampling_for(p.subsampling, task.scale, p.adaptive_threshold)
        try:
            jpg = encode_jpeg(rgb, p.quality, sub)
        except Exception as exc:  # noqa: BLE001 - recorded per sample
            out.update(status="encode_error", error=f"{type(exc).__name__}: {exc}")
            return out
        clock("encode")
        h, w = rgb.shape[:2]
        out["subsampling"] = sub
    # Not fsynced per image (a large share of the per-image cost); a reused store file is
    # checked against its recorded size, so a file lost to a power cut is rendered again.
    atomic_write_bytes(task.out_path, jpg, durable=False)
    out.update(bytes=len(jpg), sha256=hashlib.sha256(jpg).hexdigest(), width=w, height=h)
    clock("write")
    return out
