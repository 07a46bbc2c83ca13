"""Stage 2: bucket assignment (one row per image and base resolution)."""


import dagster as dg
import pyarrow as pa

from bucket_assets.core.buckets import assign, bucket_table
from bucket_assets.core.db import replace_table
from bucket_assets.defs.assets.ingest import filtered_images
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import DatasetResource

ASSIGNMENT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("key", pa.string()),
        ("base_resolution", pa.int32()),
        ("bucket_id", pa.string()),
        ("target_w", pa.int32()),
        ("target_h", pa.int32()),
        ("src_w", pa.int32()),
        ("src_h", pa.int32()),
        ("scale", pa.float64()),
        ("status", pa.string()),
        ("resized_w", pa.int32()),
        ("resized_h", pa.int32()),
        ("crop_left", pa.int32()),
        ("crop_top", pa.int32()),
    ]
)


@dg.asset(group_name="buckets", deps=[filtered_images], kinds={"duckdb"})
def bucket_assignments(dataset: DatasetResource) -> dg.MaterializeResult:
    """Nearest SDXL bucket by log aspect ratio per base resolution, the cover scale, resized size
    and crop box; 'too_small' where filling the bucket would need an upsample."""
    spec = dataset.load()
    with dataset.db() as con:
        kept = con.execute(
            """SELECT r.image_id, r.width, r.height FROM raw_index r
               JOIN filtered_images f USING (row_id) WHERE f.decision = 'keep' ORDER BY r.row_id"""
        ).fetchall()
    crop = spec.image.crop
    rows = assign(
        kept,
        bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible),
        crop.strategy,
        list(crop.allowed_corners),
        crop.jitter,
    )
    table = pa.Table.from_pylist(rows, schema=ASSIGNMENT_SCHEMA)
    with dataset.db() as con:
        replace_table(con, "bucket_assignments", table)
        counts = con.execute(
            """SELECT bucket_id, count(*) FROM bucket_assignments WHERE status = 'ok'
               GROUP BY bucket_id ORDER BY count(*) DESC, bucket_id"""
        ).fetchall()
        too_small = con.execute("SELECT count(*) FROM bucket_assignments WHERE status = 'too_small'").fetchone()[0]
    return dg.MaterializeResult(
        metadata={"dagster/row_count": table.num_rows, "too_small": too_small, "per_bucket": md_counts(counts)}
    )
