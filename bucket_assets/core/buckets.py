"""SDXL-style aspect-ratio buckets: the proto table, scaled targets, assignment and crop boxes."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

# The 40 proto buckets of the seed card (bucketed_shards_v1), as (w, h) at the 1024 base.
PROTO_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832),
    (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512),
    (1984, 512), (2048, 512),
    (960, 1024), (960, 1088), (896, 1088), (896, 1152), (832, 1152), (832, 1216),
    (768, 1280), (768, 1344), (704, 1408), (704, 1472), (640, 1536), (640, 1600),
    (576, 1664), (576, 1728), (576, 1792), (512, 1856), (512, 1920), (512, 1984),
    (512, 2048),
)
PROTO_BASE = 1024
CORNERS = {0: "TL", 1: "TR", 2: "BL", 3: "BR"}
# Scales within this of 1.0 count as "no resize": float noise must not turn 1.0 into an upsample.
SCALE_EPS = 1e-9


@dataclass(frozen=True)
class Bucket:
    id: str
    proto_w: int
    proto_h: int
    base_resolution: int
    w: int
    h: int

    @property
    def aspect(self) -> float:
        return self.w / self.h

    @property
    def proto_id(self) -> str:
        return f"p{self.proto_w}x{self.proto_h}"


def scale_side(proto: int, base: int, divisible: int) -> int:
    """proto * base / 1024, rounded half-up to a multiple of `divisible` (at least one multiple).

    At base 512 every SDXL proto side is a multiple of 64, so the target is exactly half.
    """
    exact = proto * base / PROTO_BASE
    return max(divisible, math.floor(exact / divisible + 0.5) * divisible)


def bucket_table(base_resolutions: list[int] | tuple[int, ...], divisible: int) -> list[Bucket]:
    """All buckets of an export; ids are `p<w>x<h>` single-res or `r<base>_p<w>x<h>` multi-res."""
    multi = len(base_resolutions) > 1
    out = []
    for base in base_resolutions:
        for pw, ph in PROTO_BUCKETS:
            proto_id = f"p{pw}x{ph}"
            out.append(
                Bucket(
                    id=f"r{base}_{proto_id}" if multi else proto_id,
                    proto_w=pw,
                    proto_h=ph,
                    base_resolution=base,
                    w=scale_side(pw, base, divisible),
                    h=scale_side(ph, base, divisible),
                )
            )
    return out


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose target aspect is nearest in log space: |ln(w/h) - ln(tw/th)|.

    The log metric is symmetric for portrait and landscape (2:1 is as far from 1:1 as 1:2).
    Ties go to the larger target area, then the smaller id, so the choice is total.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    la = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(la - math.log(b.aspect)), 12), -(b.w * b.h), b.id))


@dataclass(frozen=True)
class CoverPlan:
    """How one image becomes one bucket sample: cover-resize to (resized_w, resized_h), then crop."""

    bucket_id: str
    target_w: int
    target_h: int
    scale: float
    resized_w: int
    resized_h: int
    crop_left: int
    crop_top: int


def cover_scale(src_w: int, src_h: int, target_w: int, target_h: int) -> float:
    return max(target_w / src_w, target_h / src_h)


def is_upsample(scale: float) -> bool:
    return scale > 1 + SCALE_EPS


def resized_size(src_w: int, src_h: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Size after cover-resize: each side rounded, never below the target (so the crop fits)."""
    s = cover_scale(src_w, src_h, target_w, target_h)
    if s >= 1 - SCALE_EPS:
        return src_w, src_h
    return max(target_w, round(src_w * s)), max(target_h, round(src_h * s))


def _key_digest(image_id: str) -> bytes:
    return hashlib.sha256(image_id.encode("utf-8")).digest()


def crop_origin(
    resized_w: int,
    resized_h: int,
    target_w: int,
    target_h: int,
    image_id: str,
    strategy: str = "corner",
    allowed_corners: list[int] | tuple[int, ...] = (2, 3),
    jitter: int = 0,
) -> tuple[int, int]:
    """Top-left of the crop box, deterministic in sha256(image_id).

    corner: corner = allowed[digest[0..8] mod n] (0=TL, 1=TR, 2=BL, 3=BR), then moved inward by
    up to `jitter` px on each axis (digest bytes 8..16), clamped to the image.
    center: floor((resized - target) / 2) on each axis.
    """
    free_x, free_y = resized_w - target_w, resized_h - target_h
    if free_x < 0 or free_y < 0:
        raise ValueError(f"crop {target_w}x{target_h} does not fit in {resized_w}x{resized_h}")
    if strategy == "center":
        return free_x // 2, free_y // 2
    if strategy != "corner":
        raise ValueError(f"unknown crop strategy {strategy!r}")
    digest = _key_digest(image_id)
    corners = list(allowed_corners)
    corner = corners[int.from_bytes(digest[0:8], "big") % len(corners)]
    jx = jy = 0
    if jitter > 0:
        jx = int.from_bytes(digest[8:12], "big") % (jitter + 1)
        jy = int.from_bytes(digest[12:16], "big") % (jitter + 1)
    left = free_x - min(jx, free_x) if corner in (1, 3) else min(jx, free_x)
    top = free_y - min(jy, free_y) if corner in (2, 3) else min(jy, free_y)
    return left, top


def plan_cover(
    src_w: int,
    src_h: int,
    bucket: Bucket,
    image_id: str,
    strategy: str = "corner",
    allowed_corners: list[int] | tuple[int, ...] = (2, 3),
    jitter: int = 0,
) -> CoverPlan | None:
    """The cover-resize and crop for one image in one bucket, or None if it would upsample."""
    scale = cover_scale(src_w, src_h, bucket.w, bucket.h)
    if is_upsample(scale):
        return None
    rw, rh = resized_size(src_w, src_h, bucket.w, bucket.h)
    left, top = crop_origin(rw, rh, bucket.w, bucket.h, image_id, strategy, allowed_corners, jitter)
    return CoverPlan(bucket.id, bucket.w, bucket.h, scale, rw, rh, left, top)


def smallest_upsample(width: int, height: int, buckets: list[Bucket]) -> tuple[float, Bucket]:
    """Over base resolutions, the nearest bucket needing the least scale; scale > 1 means the
    image fills no bucket at any base resolution (too_small)."""
    by_base: dict[int, list[Bucket]] = {}
    for b in buckets:
        by_base.setdefault(b.base_resolution, []).append(b)
    best = None
    for table in by_base.values():
        b = nearest_bucket(width, height, table)
        s = cover_scale(width, height, b.w, b.h)
        if best is None or s < best[0]:
            best = (s, b)
    assert best is not None
    return best


def assign(
    images: list[tuple[str, int, int]],
    buckets: list[Bucket],
    strategy: str = "corner",
    allowed_corners: list[int] | tuple[int, ...] = (2, 3),
    jitter: int = 0,
) -> list[dict]:
    """One row per (image, base resolution): the nearest bucket at that base and its cover plan,
    or status 'too_small' when filling that bucket would need an upsample."""
    from bucket_assets.core.shards import sample_key

    by_base: dict[int, list[Bucket]] = {}
    for b in buckets:
        by_base.setdefault(b.base_resolution, []).append(b)
    rows = []
    for image_id, w, h in images:
        key = sample_key(image_id)
        for base, table in by_base.items():
            b = nearest_bucket(w, h, table)
            plan = plan_cover(w, h, b, image_id, strategy, allowed_corners, jitter)
            row = {
                "image_id": image_id,
                "key": key,
                "base_resolution": base,
                "bucket_id": b.id,
                "target_w": b.w,
                "target_h": b.h,
                "src_w": w,
                "src_h": h,
                "scale": cover_scale(w, h, b.w, b.h),
                "status": "ok" if plan else "too_small",
                "resized_w": plan.resized_w if plan else None,
                "resized_h": plan.resized_h if plan else None,
                "crop_left": plan.crop_left if plan else None,
                "crop_top": plan.crop_top if plan else None,
            }
            rows.append(row)
    return rows
