"""SDXL-style aspect-ratio buckets: the proto table, scaled targets, assignment and crop boxes."""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa

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
    """Size after cover-resize: each side rounded half-up, never below the target (so the crop fits)."""
    s = cover_scale(src_w, src_h, target_w, target_h)
    if s >= 1 - SCALE_EPS:
        return src_w, src_h
    return max(target_w, math.floor(src_w * s + 0.5)), max(target_h, math.floor(src_h * s + 0.5))


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


# Set-based assignment ---------------------------------------------------------------------
# The functions above define the semantics one image at a time; the SQL below applies exactly
# those rules to a whole table in DuckDB (tests check the two agree on many random sizes).


def bucket_intervals(buckets: list[Bucket]) -> pa.Table:
    """Per base resolution, the log-aspect interval [lo, next lo) where each bucket is nearest.

    Buckets with the same target aspect collapse to the one nearest_bucket would pick (larger
    area, then smaller id); interval edges are the midpoints between neighbouring log aspects.
    """
    rows = []
    by_base: dict[int, list[Bucket]] = {}
    for b in buckets:
        by_base.setdefault(b.base_resolution, []).append(b)
    for base, table in by_base.items():
        best: dict[float, Bucket] = {}
        for b in sorted(table, key=lambda b: (-(b.w * b.h), b.id)):
            best.setdefault(round(math.log(b.aspect), 12), b)
        prev = None
        for la in sorted(best):
            b = best[la]
            lo = -math.inf if prev is None else (prev + la) / 2
            rows.append({"base_resolution": base, "lo": lo, "bucket_id": b.id, "target_w": b.w, "target_h": b.h})
            prev = la
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema([("base_resolution", pa.int32()), ("lo", pa.float64()), ("bucket_id", pa.string()),
                          ("target_w", pa.int32()), ("target_h", pa.int32())]),
    )


def _hex_int(expr: str, start: int, length: int) -> str:
    return f"('0x' || substr({expr}, {start}, {length}))::UBIGINT"


# `_images(image_id, width, height)` x `_bucket_intervals` -> one row per image and base.
CHOICE_SQL = """
SELECT i.image_id, i.width AS src_w, i.height AS src_h, iv.base_resolution, iv.bucket_id,
       iv.target_w, iv.target_h,
       greatest(iv.target_w / i.width, iv.target_h / i.height) AS scale
FROM (SELECT *, ln(width / height) AS la FROM _images) i
CROSS JOIN (SELECT DISTINCT base_resolution AS b FROM _bucket_intervals) bases
ASOF JOIN _bucket_intervals iv ON iv.base_resolution = bases.b AND i.la >= iv.lo
"""

ASSIGN_SQL = f"""
WITH c AS ({CHOICE_SQL}),
sized AS (
    SELECT *, scale > 1 + {SCALE_EPS} AS upsample,
           CASE WHEN scale >= 1 - {SCALE_EPS} THEN src_w
                ELSE greatest(target_w, floor(src_w * scale + 0.5)::BIGINT) END::BIGINT AS rw,
           CASE WHEN scale >= 1 - {SCALE_EPS} THEN src_h
                ELSE greatest(target_h, floor(src_h * scale + 0.5)::BIGINT) END::BIGINT AS rh,
           sha256(image_id) AS digest
    FROM c
),
cropped AS (
    SELECT *, rw - target_w AS free_x, rh - target_h AS free_y,
           list_extract($corners, ({_hex_int('digest', 1, 16)} % len($corners))::INTEGER + 1) AS corner,
           CASE WHEN $jitter > 0 THEN {_hex_int('digest', 17, 8)} % ($jitter + 1) ELSE 0 END AS jx,
           CASE WHEN $jitter > 0 THEN {_hex_int('digest', 25, 8)} % ($jitter + 1) ELSE 0 END AS jy
    FROM sized
)
SELECT image_id,
       CASE WHEN regexp_full_match(image_id, '[A-Za-z0-9_-]{{1,80}}')
                 AND NOT regexp_matches(image_id, '-[0-9a-f]{{12}}$') THEN image_id
            ELSE left(regexp_replace(image_id, '[^A-Za-z0-9_-]', '_', 'g'), 67) || '-' || left(digest, 12)
       END AS key,
       base_resolution::INTEGER AS base_resolution, bucket_id, target_w::INTEGER AS target_w,
       target_h::INTEGER AS target_h, src_w::INTEGER AS src_w, src_h::INTEGER AS src_h, scale,
       CASE WHEN upsample THEN 'too_small' ELSE 'ok' END AS status,
       CASE WHEN upsample THEN NULL ELSE rw::INTEGER END AS resized_w,
       CASE WHEN upsample THEN NULL ELSE rh::INTEGER END AS resized_h,
       CASE WHEN upsample THEN NULL
            WHEN $strategy = 'center' THEN (free_x // 2)::INTEGER
            WHEN corner IN (1, 3) THEN (free_x - least(jx, free_x))::INTEGER
            ELSE least(jx, free_x)::INTEGER END AS crop_left,
       CASE WHEN upsample THEN NULL
            WHEN $strategy = 'center' THEN (free_y // 2)::INTEGER
            WHEN corner IN (2, 3) THEN (free_y - least(jy, free_y))::INTEGER
            ELSE least(jy, free_y)::INTEGER END AS crop_top
FROM cropped
"""


@contextmanager
def _registered(con, images_sql: str, buckets: list[Bucket], params: list | None = None):
    con.execute(f"CREATE OR REPLACE TEMP VIEW _images AS {images_sql}", params or [])
    con.register("_bucket_intervals", bucket_intervals(buckets))
    try:
        yield
    finally:
        con.unregister("_bucket_intervals")
        con.execute("DROP VIEW IF EXISTS _images")


def assign_sql(
    con,
    images_sql: str,
    buckets: list[Bucket],
    target_table: str,
    strategy: str = "corner",
    allowed_corners: list[int] | tuple[int, ...] = (2, 3),
    jitter: int = 0,
) -> None:
    """CREATE OR REPLACE `target_table` with one row per (image, base resolution): nearest bucket,
    cover scale, resized size and crop box, or status 'too_small'. `images_sql` selects
    (image_id, width, height); `target_table` is a constant of the caller's code."""
    with _registered(con, images_sql, buckets):
        con.execute(
            f'CREATE OR REPLACE TABLE "{target_table}" AS {ASSIGN_SQL} ORDER BY image_id, base_resolution',
            {"corners": [int(c) for c in allowed_corners], "jitter": int(jitter), "strategy": strategy},
        )


# The kept images bucket_assignments is built from.
KEPT_IMAGES_SQL = """SELECT r.image_id, r.width, r.height FROM raw_index r
                     JOIN filtered_images f USING (row_id) WHERE f.decision = 'keep'"""


def assign_buckets(con, buckets: list[Bucket], strategy: str, allowed_corners: list[int] | tuple[int, ...],
                   jitter: int) -> bool:
    """Table bucket_assignments for the kept images (assign_sql). Kept as it is when raw_index,
    filtered_images and these settings are those it was built from (core.db.rebuild_unless_current);
    returns whether it was built."""
    from bucket_assets.core.db import rebuild_unless_current

    settings = {"buckets": [str(b) for b in buckets], "strategy": strategy, "corners": [int(c) for c in allowed_corners],
                "jitter": int(jitter), "sql": [KEPT_IMAGES_SQL, ASSIGN_SQL, CHOICE_SQL, SCALE_EPS]}
    return rebuild_unless_current(
        con, "bucket_assignments", ["raw_index", "filtered_images"], settings,
        lambda: assign_sql(con, KEPT_IMAGES_SQL, buckets, "bucket_assignments", strategy, allowed_corners, jitter))


def fit_sql(con, images_sql: str, buckets: list[Bucket], target_table: str) -> None:
    """`target_table`(image_id, too_small, detail): too_small when no base resolution's nearest
    bucket can be filled without upsampling. `images_sql` selects (image_id, width, height)."""
    with _registered(con, images_sql, buckets):
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE "{target_table}" AS
                SELECT image_id, min(scale) > 1 + {SCALE_EPS} AS too_small,
                       CASE WHEN min(scale) > 1 + {SCALE_EPS}
                            THEN printf('%dx%d needs x%.3f to fill %s (%dx%d)', any_value(src_w), any_value(src_h),
                                        min(scale), arg_min(bucket_id, scale), arg_min(target_w, scale),
                                        arg_min(target_h, scale)) END AS detail
                FROM ({CHOICE_SQL}) GROUP BY image_id"""
        )
