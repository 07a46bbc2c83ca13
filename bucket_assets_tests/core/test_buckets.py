"""Aspect-ratio buckets: the proto table, scaled targets, nearest bucket, cover plans, crops."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from bucket_assets.core.buckets import (
    PROTO_BUCKETS,
    Bucket,
    assign_sql,
    bucket_table,
    crop_origin,
    nearest_bucket,
    plan_cover,
    resized_size,
    scale_side,
)
from bucket_assets.core.shards import sample_key

SEED_CARD = Path("/work/shared/seeds/laion_aesthetics_512_bucketed_card.txt")

# (bucket_id, target_w, target_h) copied from the seed card's "Bucket distribution" table.
SEED_BUCKETS_512 = [
    ("p1216x832", 608, 416), ("p832x1216", 416, 608), ("p1024x1024", 512, 512),
    ("p1152x832", 576, 416), ("p1344x768", 672, 384), ("p832x1152", 416, 576),
    ("p896x1152", 448, 576), ("p1280x768", 640, 384), ("p1152x896", 576, 448),
    ("p896x1088", 448, 544), ("p1088x896", 544, 448), ("p960x1088", 480, 544),
    ("p1088x960", 544, 480), ("p1344x704", 672, 352), ("p960x1024", 480, 512),
    ("p768x1280", 384, 640), ("p1024x960", 512, 480), ("p1408x704", 704, 352),
    ("p768x1344", 384, 672), ("p1472x704", 736, 352), ("p1536x640", 768, 320),
    ("p704x1408", 352, 704), ("p1600x640", 800, 320), ("p704x1472", 352, 736),
    ("p1664x576", 832, 288), ("p1728x576", 864, 288), ("p1792x576", 896, 288),
    ("p640x1536", 320, 768), ("p640x1600", 320, 800), ("p1856x512", 928, 256),
    ("p512x2048", 256, 1024), ("p576x1664", 288, 832), ("p576x1792", 288, 896),
    ("p576x1728", 288, 864), ("p2048x512", 1024, 256), ("p512x1856", 256, 928),
    ("p1920x512", 960, 256), ("p1984x512", 992, 256), ("p512x1984", 256, 992),
    ("p512x1920", 256, 960),
]


def _table512() -> list[Bucket]:
    return bucket_table([512], 32)


def _by_id(table: list[Bucket]) -> dict[str, Bucket]:
    return {b.id: b for b in table}


# bucket_table / scale_side -------------------------------------------------------------


def test_single_res_table_matches_seed_card():
    table = _table512()
    assert len(table) == 40
    assert len({b.id for b in table}) == 40
    assert sorted((b.id, b.w, b.h) for b in table) == sorted(SEED_BUCKETS_512)
    assert all(b.base_resolution == 512 for b in table)


def test_single_res_table_matches_seed_card_file_when_present():
    if not SEED_CARD.is_file():
        pytest.skip("seed card not available")
    text = SEED_CARD.read_text(encoding="utf-8")
    section = text.split("Bucket distribution:", 1)[1].split("##", 1)[0]
    rows = re.findall(r"^\|\s*(p\d+x\d+)\s*\|\s*(\d+)×(\d+)\s*\|", section, flags=re.M)
    parsed = sorted((bid, int(w), int(h)) for bid, w, h in rows)
    assert len(parsed) == 40
    assert parsed == sorted(SEED_BUCKETS_512)
    assert sorted((b.id, b.w, b.h) for b in _table512()) == parsed


def test_proto_ids_and_aspects_are_consistent():
    for b in _table512():
        assert b.id == b.proto_id == f"p{b.proto_w}x{b.proto_h}"
        # at base 512 every target is exactly half the proto
        assert (b.w, b.h) == (b.proto_w // 2, b.proto_h // 2)
        assert b.w % 32 == 0 and b.h % 32 == 0


def test_multi_res_ids_and_count():
    table = bucket_table([512, 256], 32)
    assert len(table) == 80
    ids = [b.id for b in table]
    assert len(set(ids)) == 80
    r512 = [b for b in table if b.base_resolution == 512]
    r256 = [b for b in table if b.base_resolution == 256]
    assert len(r512) == len(r256) == 40
    assert all(b.id == f"r512_{b.proto_id}" for b in r512)
    assert all(b.id == f"r256_{b.proto_id}" for b in r256)
    # the r512 targets are the single-res ones
    single = {b.id: (b.w, b.h) for b in _table512()}
    assert {b.proto_id: (b.w, b.h) for b in r512} == single
    r256_by = _by_id(r256)
    assert (r256_by["r256_p1024x1024"].w, r256_by["r256_p1024x1024"].h) == (256, 256)
    # 1216*256/1024 = 304 -> 9.5 multiples of 32 -> half-up -> 320; 832/4 = 208 -> 6.5 -> 224
    assert (r256_by["r256_p1216x832"].w, r256_by["r256_p1216x832"].h) == (320, 224)


@pytest.mark.parametrize(
    "proto, base, divisible, expected",
    [
        (1216, 256, 32, 320),  # 304 = 9.5 * 32 -> rounds half up to 10 * 32
        (832, 256, 32, 224),  # 208 = 6.5 * 32 -> 7 * 32
        (960, 256, 32, 256),  # 240 = 7.5 * 32 -> 8 * 32
        (1088, 256, 32, 288),  # 272 = 8.5 * 32 -> 9 * 32
        (1152, 256, 32, 288),  # 288 exactly
        (1344, 768, 64, 1024),  # 1008 = 15.75 * 64 -> 16 * 64
        (1216, 768, 64, 896),  # 912 = 14.25 * 64 -> 14 * 64
        (1216, 512, 32, 608),  # exactly half
        (2048, 512, 32, 1024),
        (512, 64, 32, 32),  # 32 exactly
        (512, 64, 64, 64),  # 32 = 0.5 * 64 -> 1 * 64
        (512, 64, 128, 128),  # 0.25 multiples -> rounds to 0, clamped to one multiple
        (1024, 1024, 1, 1024),
    ],
)
def test_scale_side_rounds_half_up_to_divisible(proto, base, divisible, expected):
    assert scale_side(proto, base, divisible) == expected


def test_scale_side_is_multiple_of_divisible_for_all_protos():
    for base in (256, 384, 640, 768, 1024):
        for div in (8, 32, 64):
            for pw, ph in PROTO_BUCKETS:
                for side in (pw, ph):
                    got = scale_side(side, base, div)
                    assert got % div == 0 and got >= div
                    assert abs(got - side * base / 1024) <= div / 2


# nearest_bucket ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w, h, expected",
    [
        (1000, 1000, "p1024x1024"),
        (3000, 2000, "p1216x832"),  # 3:2 landscape
        (2000, 3000, "p832x1216"),  # 2:3 portrait, the mirror
        (10000, 1000, "p2048x512"),  # beyond the widest bucket
        (1000, 10000, "p512x2048"),
        (4000, 1000, "p2048x512"),  # exactly 4:1
        (1920, 1080, "p1344x768"),  # 16:9 = 1.778, nearest 1.75
        (1080, 1920, "p768x1344"),
    ],
)
def test_nearest_bucket(w, h, expected):
    assert nearest_bucket(w, h, _table512()).id == expected


def test_nearest_bucket_portrait_mirrors_landscape():
    table = _table512()
    for w, h in [(1000, 1000), (1100, 1000), (1300, 900), (1500, 1000), (1700, 1000), (2500, 1000), (3300, 1000), (9000, 1000)]:
        land = nearest_bucket(w, h, table)
        port = nearest_bucket(h, w, table)
        assert (port.proto_w, port.proto_h) == (land.proto_h, land.proto_w), (w, h)


def test_nearest_bucket_minimises_log_aspect_distance():
    table = _table512()
    for w in range(300, 3000, 37):
        h = 1000
        best = nearest_bucket(w, h, table)
        d = abs(math.log(w / h) - math.log(best.aspect))
        assert all(d <= abs(math.log(w / h) - math.log(b.aspect)) + 1e-12 for b in table)


def test_nearest_bucket_tie_prefers_larger_area_then_smaller_id():
    # At base 256 p1024x1024 and p1024x960 both scale to 256x256: an exact tie on aspect and area.
    table = [b for b in bucket_table([512, 256], 32) if b.base_resolution == 256]
    assert nearest_bucket(1000, 1000, table).id == "r256_p1024x1024"
    a = Bucket("small", 1, 1, 512, 64, 64)
    b = Bucket("big", 1, 1, 512, 128, 128)
    assert nearest_bucket(50, 50, [a, b]).id == "big"


def test_nearest_bucket_rejects_non_positive_size():
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, _table512())
    with pytest.raises(ValueError):
        nearest_bucket(10, -1, _table512())


# plan_cover / resized_size ---------------------------------------------------------------


def test_plan_cover_none_when_upsampling():
    b = _by_id(_table512())["p1024x1024"]  # 512x512
    assert plan_cover(511, 2000, b, "x") is None
    assert plan_cover(2000, 511, b, "x") is None
    assert plan_cover(100, 100, b, "x") is None


def test_plan_cover_exact_fit_has_no_resize():
    b = _by_id(_table512())["p1024x1024"]
    plan = plan_cover(512, 512, b, "img")
    assert plan is not None
    assert plan.scale == 1.0
    assert (plan.resized_w, plan.resized_h) == (512, 512)
    assert (plan.crop_left, plan.crop_top) == (0, 0)
    assert (plan.bucket_id, plan.target_w, plan.target_h) == ("p1024x1024", 512, 512)


def test_plan_cover_one_side_exact_other_longer_keeps_size():
    b = _by_id(_table512())["p1216x832"]  # 608x416
    plan = plan_cover(608, 500, b, "img", allowed_corners=[2])
    assert (plan.resized_w, plan.resized_h) == (608, 500)  # scale 1: no resize
    assert (plan.crop_left, plan.crop_top) == (0, 500 - 416)  # bottom-left


def test_plan_cover_downscale_sizes():
    b = _by_id(_table512())["p1216x832"]  # 608x416
    plan = plan_cover(1216, 900, b, "img")
    assert plan.scale == pytest.approx(0.5)
    assert (plan.resized_w, plan.resized_h) == (608, 450)
    plan = plan_cover(1300, 832, b, "img")
    assert plan.scale == pytest.approx(0.5)
    assert (plan.resized_w, plan.resized_h) == (650, 416)


def test_resized_size_never_below_target():
    table = _table512()
    for w in range(400, 5000, 97):
        for h in range(400, 5000, 131):
            b = nearest_bucket(w, h, table)
            plan = plan_cover(w, h, b, f"{w}x{h}")
            if plan is None:
                assert max(b.w / w, b.h / h) > 1
                continue
            assert plan.resized_w >= b.w and plan.resized_h >= b.h
            assert plan.resized_w <= w and plan.resized_h <= h
            # one side is (almost) exactly the target: cover, not over-cover
            assert plan.resized_w == b.w or plan.resized_h == b.h or (plan.resized_w, plan.resized_h) == (w, h)
            assert 0 <= plan.crop_left <= plan.resized_w - b.w
            assert 0 <= plan.crop_top <= plan.resized_h - b.h


def test_resized_size_float_noise_is_not_an_upsample():
    # 608/1216 and 416/832 are both 0.5; scales that are 1.0 up to float noise keep the source size
    assert resized_size(608, 416, 608, 416) == (608, 416)
    assert resized_size(1216, 832, 608, 416) == (608, 416)


# crop_origin -------------------------------------------------------------------------------


def test_crop_origin_deterministic_per_image_id():
    a = crop_origin(800, 700, 512, 512, "image-1", allowed_corners=[0, 1, 2, 3], jitter=20)
    b = crop_origin(800, 700, 512, 512, "image-1", allowed_corners=[0, 1, 2, 3], jitter=20)
    assert a == b


def test_crop_origin_depends_on_image_id():
    origins = {crop_origin(800, 700, 512, 512, f"img{i}", allowed_corners=[0, 1, 2, 3]) for i in range(64)}
    assert origins == {(0, 0), (288, 0), (0, 188), (288, 188)}


@pytest.mark.parametrize("corner, expected", [(0, (0, 0)), (1, (288, 0)), (2, (0, 188)), (3, (288, 188))])
def test_crop_origin_single_corner(corner, expected):
    for image_id in ("a", "b", "c/d.jpg"):
        assert crop_origin(800, 700, 512, 512, image_id, allowed_corners=[corner]) == expected


def test_crop_origin_default_corners_are_bottom():
    for i in range(32):
        left, top = crop_origin(800, 700, 512, 512, f"id{i}")
        assert top == 188
        assert left in (0, 288)


@pytest.mark.parametrize("corner", [0, 1, 2, 3])
def test_crop_origin_jitter_moves_inward_within_bounds(corner):
    jitter = 10
    seen = set()
    for i in range(200):
        left, top = crop_origin(800, 700, 512, 512, f"j{i}", allowed_corners=[corner], jitter=jitter)
        assert 0 <= left <= 288 and 0 <= top <= 188
        dx = left if corner in (0, 2) else 288 - left
        dy = top if corner in (0, 1) else 188 - top
        assert 0 <= dx <= jitter and 0 <= dy <= jitter
        seen.add((dx, dy))
    assert len(seen) > 20  # jitter actually varies


def test_crop_origin_jitter_clamped_to_free_space():
    for i in range(100):
        left, top = crop_origin(515, 512, 512, 512, f"k{i}", allowed_corners=[0, 1, 2, 3], jitter=50)
        assert 0 <= left <= 3 and top == 0


def test_crop_origin_center():
    assert crop_origin(800, 700, 512, 512, "x", strategy="center") == (144, 94)
    assert crop_origin(801, 513, 512, 512, "x", strategy="center") == (144, 0)
    assert crop_origin(512, 512, 512, 512, "x", strategy="center") == (0, 0)


def test_crop_origin_errors():
    with pytest.raises(ValueError):
        crop_origin(500, 700, 512, 512, "x")
    with pytest.raises(ValueError):
        crop_origin(800, 700, 512, 512, "x", strategy="random")


# assign (set-based, in DuckDB) ------------------------------------------------------------------


def assign(images, buckets, strategy="corner", allowed_corners=(2, 3), jitter=0) -> list[dict]:
    """Run the product's SQL assignment over (image_id, w, h) rows; rows in input order."""
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    con.register("_in", pa.table({"image_id": [i for i, _, _ in images], "width": [w for _, w, _ in images],
                                  "height": [h for _, _, h in images], "pos": list(range(len(images)))}))
    con.execute("CREATE TABLE pos AS SELECT image_id, pos FROM _in")
    assign_sql(con, "SELECT image_id, width, height FROM _in", buckets, "out", strategy, list(allowed_corners), jitter)
    rows = con.execute("SELECT o.* FROM out o JOIN pos USING (image_id) ORDER BY pos, base_resolution DESC").to_arrow_table()
    return rows.to_pylist()


def oracle(images, buckets, strategy="corner", allowed_corners=(2, 3), jitter=0) -> list[dict]:
    """The same rows from the one-image reference functions."""
    by_base: dict[int, list] = {}
    for b in buckets:
        by_base.setdefault(b.base_resolution, []).append(b)
    rows = []
    for image_id, w, h in images:
        for base in sorted(by_base, reverse=True):
            b = nearest_bucket(w, h, by_base[base])
            plan = plan_cover(w, h, b, image_id, strategy, allowed_corners, jitter)
            rows.append({
                "image_id": image_id, "key": sample_key(image_id), "base_resolution": base, "bucket_id": b.id,
                "target_w": b.w, "target_h": b.h, "status": "ok" if plan else "too_small",
                "resized_w": plan.resized_w if plan else None, "resized_h": plan.resized_h if plan else None,
                "crop_left": plan.crop_left if plan else None, "crop_top": plan.crop_top if plan else None,
            })
    return rows


def test_assign_one_row_per_image_and_base():
    table = bucket_table([512, 256], 32)
    images = [("big", 3000, 2000), ("mid", 400, 300), ("a.b/c d", 1024, 1024)]
    rows = assign(images, table)
    assert len(rows) == 6
    by = {(r["image_id"], r["base_resolution"]): r for r in rows}
    assert set(by) == {(i, b) for i, _, _ in images for b in (512, 256)}

    r = by[("big", 512)]
    assert r["bucket_id"] == "r512_p1216x832" and (r["target_w"], r["target_h"]) == (608, 416)
    assert r["status"] == "ok" and r["src_w"] == 3000 and r["src_h"] == 2000
    assert r["resized_w"] >= 608 and r["resized_h"] >= 416
    assert r["key"] == "big"

    # 400x300 cannot fill a 512-base bucket without upsampling, but fits at 256
    small = by[("mid", 512)]
    assert small["status"] == "too_small"
    assert small["scale"] > 1
    assert small["resized_w"] is None and small["crop_left"] is None and small["crop_top"] is None
    fits = by[("mid", 256)]
    assert fits["status"] == "ok" and fits["bucket_id"].startswith("r256_")

    odd = by[("a.b/c d", 512)]
    assert odd["key"] == sample_key("a.b/c d") and "." not in odd["key"]
    assert odd["bucket_id"] == "r512_p1024x1024"


@pytest.mark.parametrize(
    "bases,strategy,corners,jitter",
    [([512], "corner", [2, 3], 0), ([512], "corner", [0, 1, 2, 3], 7), ([512, 256], "center", [2, 3], 0),
     ([1024, 384], "corner", [1], 3)],
)
def test_sql_assignment_equals_the_reference_functions(bases, strategy, corners, jitter):
    import random

    rnd = random.Random(sum(bases) + jitter)
    ids = ["plain", "a.b", "x y/z", "ünï", "q" * 120, "dup-0123456789ab", "5000", "with_under-score"]
    images = [(ids[i] if i < len(ids) else f"img{i}.{rnd.randint(0, 9)}", rnd.randint(64, 4000), rnd.randint(64, 4000))
              for i in range(3000)]
    images += [(f"exact{i}", b.w, b.h) for i, b in enumerate(bucket_table(bases, 32))]
    table = bucket_table(bases, 32)
    got = [{k: r[k] for k in ("image_id", "key", "base_resolution", "bucket_id", "target_w", "target_h", "status",
                             "resized_w", "resized_h", "crop_left", "crop_top")} for r in assign(images, table, strategy, corners, jitter)]
    want = oracle(images, table, strategy, corners, jitter)
    assert len(got) == len(want)
    got_by = {(r["image_id"], r["base_resolution"]): r for r in got}
    want_by = {(r["image_id"], r["base_resolution"]): r for r in want}
    assert got_by.keys() == want_by.keys()
    mismatches = [(got_by[k], want_by[k]) for k in want_by if got_by[k] != want_by[k]]
    assert not mismatches, mismatches[:3]
