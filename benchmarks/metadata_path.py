"""Benchmark: the metadata path at LAION scale, through the product's own stage functions.

    python benchmarks/metadata_path.py --rows 10000000 --out /tmp/bench_meta

Generates (in DuckDB, no image bytes) a raw index of N rows shaped like the product's
`raw_index` (ids, sizes, LAION-style similarity / NSFW / caption) and two landing caption
sources of N and N/10 rows, then times each metadata stage as the assets run it:
filter decisions, bucket assignment, caption table, waterfall selection, and the per-bucket
sample lists the shard writer reads (with a synthetic processed_images table standing in for
the image stage). Prints seconds per stage, peak RSS and row counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bucket_assets.core.buckets import assign_sql, bucket_table  # noqa: E402
from bucket_assets.core.captions import build_caption_table, read_landing_meta, select_captions  # noqa: E402
from bucket_assets.core.db import connect  # noqa: E402
from bucket_assets.core.filters import apply_filters  # noqa: E402
from bucket_assets.core.shards import read_sample_plan, write_sample_plan  # noqa: E402
from bucket_assets.spec import Filters  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RAW_SQL = """
CREATE OR REPLACE TABLE raw_index AS
SELECT i::BIGINT AS row_id,
       'img' || lpad(i::VARCHAR, 10, '0') AS image_id,
       'laion' AS source, 'webdataset' AS source_kind,
       '/data/laion/' || lpad((i // 10000)::VARCHAR, 5, '0') || '.tar' AS location,
       lpad(i::VARCHAR, 10, '0') || '.jpg' AS member,
       ((i % 10000) * 120000)::BIGINT AS data_offset,
       (40000 + hash(i) % 120000)::BIGINT AS byte_size,
       md5(i::VARCHAR) || md5((i + 1)::VARCHAR) AS sha256,
       (200 + hash(i * 3) % 1800)::INTEGER AS width,
       (200 + hash(i * 7) % 1800)::INTEGER AS height,
       'JPEG' AS format, 'RGB' AS mode, 1::TINYINT AS orientation,
       'an alt text for image ' || i AS caption, 'txt' AS caption_field,
       'https://example.com/' || i || '.jpg' AS url,
       (0.2 + (hash(i * 11) % 1000) / 4000.0)::DOUBLE AS similarity,
       CASE WHEN hash(i * 13) % 100 = 0 THEN 'NSFW' ELSE 'UNLIKELY' END AS nsfw,
       NULL::VARCHAR AS license, NULL::INTEGER AS orig_w, NULL::INTEGER AS orig_h,
       NULL::VARCHAR AS source_meta,
       CASE WHEN hash(i * 17) % 1000 = 0 THEN 'decode_error' END AS issue,
       NULL::VARCHAR AS issue_detail, NULL::VARCHAR AS notes
FROM range($n) t(i)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out", default="/tmp/bench_meta")
    ap.add_argument("--memory-limit", default="3GB", help="the spec's metadata.memory_limit")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    landing = root / "captions"
    landing.mkdir(parents=True)
    db = root / "work" / "metadata.duckdb"
    n = args.rows
    buckets = bucket_table([512], 32)
    times: dict[str, float] = {}

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t
        print(f"{name:<28} {times[name]:7.1f}s   peak RSS {rss_mb():7.0f} MB", flush=True)
        return out

    with connect(db, args.memory_limit) as con:
        stage("generate raw index", lambda: con.execute(RAW_SQL, {"n": n}))
        for name, variant, rows, every in (("gemini", "caption_gemini_2_flash_lite", n, 1),
                                           ("mistral", "caption_mistral_medium_3_1", n // 10, 10)):
            def write(name=name, rows=rows, every=every):
                con.execute(
                    f"""COPY (SELECT 'img' || lpad((i * {every})::VARCHAR, 10, '0') AS image_id,
                                     'A caption from {name} for image ' || i AS caption,
                                     CASE WHEN i % 50 = 0 THEN 'error' ELSE 'ok' END AS status
                              FROM range({rows}) t(i))
                        TO '{landing / (name + ".parquet")}' (FORMAT parquet)"""
                )
            stage(f"generate source {name}", write)
            (landing / f"{name}.json").write_text(json.dumps({
                "variant": variant, "backend": "bench", "model": f"bench/{name}", "created_at": 1000 + rows,
                "system_prompt_sha256": "0" * 64, "user_prompt_sha256": "0" * 64}))
        gen = sum(times.values())

        stage("filter decisions", lambda: apply_filters(con, Filters(), buckets))
        stage("bucket assignment", lambda: assign_sql(
            con,
            "SELECT r.image_id, r.width, r.height FROM raw_index r JOIN filtered_images f USING (row_id) WHERE f.decision = 'keep'",
            buckets, "bucket_assignments"))
        sources = [read_landing_meta(nm, landing / f"{nm}.parquet", landing / f"{nm}.json") for nm in ("gemini", "mistral")]
        _, unknown = stage("caption table", lambda: build_caption_table(con, [("laion", "webdataset", "alt_text")], sources, 20000))
        stage("waterfall selection", lambda: select_captions(
            con, ["caption_gemini_2_flash_lite", "caption_mistral_medium_3_1", "alt_text"], "empty"))
        con.execute(
            """CREATE OR REPLACE TABLE processed_images AS
               SELECT image_id, bucket_id, key, '/work/processed/' || bucket_id || '/pack-1.bin' AS path, 0::BIGINT AS pack_offset,
                      'x' AS fingerprint, 'ok' AS status, NULL::VARCHAR AS error, 100000::BIGINT AS bytes,
                      NULL::VARCHAR AS sha256, target_w AS width, target_h AS height, 0::TINYINT AS subsampling
               FROM bucket_assignments WHERE status = 'ok'"""
        )
        plan = root / "work" / "tmp" / "plan.parquet"
        ids = [b.id for b in buckets]
        stage("per-bucket sample lists", lambda: write_sample_plan(con, ids, plan))
        counts = stage("read back per bucket", lambda: {b: len(read_sample_plan(plan, b)) for b in ids})
        kept = con.execute("SELECT count(*) FROM filtered_images WHERE decision = 'keep'").fetchone()[0]
        selected = con.execute("SELECT count(*) FROM selected_captions WHERE status = 'selected'").fetchone()[0]
        captions = con.execute("SELECT count(*) FROM captions").fetchone()[0]
    work = sum(times.values()) - gen
    print(f"\nrows {n:,}; kept {kept:,}; captions {captions:,}; selected {selected:,}; "
          f"samples {sum(counts.values()):,} in {sum(1 for c in counts.values() if c)} buckets; unknown ids {unknown}")
    print(f"metadata stages: {work:.1f}s (generation {gen:.1f}s not counted); peak RSS {rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
