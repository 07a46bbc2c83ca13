"""Stage 2: bucket assignment (one row per image and base resolution)."""


import dagster as dg

from bucket_assets.core.buckets import assign_buckets, bucket_table
from bucket_assets.defs.assets.ingest import filtered_images
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import DatasetResource

@dg.asset(group_name="buckets", deps=[filtered_images], kinds={"duckdb"})
def bucket_assignments(dataset: DatasetResource) -> dg.MaterializeResult:
    """Nearest SDXL bucket by log aspect ratio per base resolution, the cover scale, resized size
    and crop box; 'too_small' where filling the bucket would need an upsample."""
    spec = dataset.load()
    crop = spec.image.crop
    with dataset.db() as con:
        built = assign_buckets(con, bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible),
                               crop.strategy, list(crop.allowed_corners), crop.jitter)
        rows = con.execute("SELECT count(*) FROM bucket_assignments").fetchone()[0]
        counts = con.execute(
            """SELECT bucket_id, count(*) FROM bucket_assignments WHERE status = 'ok'
               GROUP BY bucket_id ORDER BY count(*) DESC, bucket_id"""
        ).fetchall()
        too_small = con.execute("SELECT count(*) FROM bucket_assignments WHERE status = 'too_small'").fetchone()[0]
    return dg.MaterializeResult(
        metadata={"dagster/row_count": rows, "too_small": too_small, "per_bucket": md_counts(counts),
                  "rebuilt": built}
    )
