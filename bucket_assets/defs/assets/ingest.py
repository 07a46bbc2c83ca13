"""Stage 1: raw index and filter decisions."""


import dagster as dg

from bucket_assets.core.buckets import bucket_table
from bucket_assets.core.db import replace_table, table_exists, transaction
from bucket_assets.core.filters import apply_filters
from bucket_assets.core.parallel import resolve_workers
from bucket_assets.core.publish import output_dir_problem
from bucket_assets.core.raw_index import build_raw_index, scan_skips_table
from bucket_assets.defs.assets.downloads import url_downloads
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import DatasetResource
from bucket_assets.spec import check_paths


@dg.asset(group_name="ingest", deps=[url_downloads], kinds={"duckdb"})
def raw_index(context: dg.AssetExecutionContext, dataset: DatasetResource) -> dg.MaterializeResult:
    """One row per source record: where its bytes are, sha256, EXIF-corrected size, format, and
    the source's caption and metadata (url, similarity, NSFW tag, license)."""
    spec = dataset.load()
    check_paths(spec)
    problem = output_dir_problem(spec.output_dir)
    if problem:
        raise dg.Failure(problem)
    downloads: dict[str, dict[str, dict]] = {}
    with dataset.db() as con:
        if table_exists(con, "url_downloads"):
            for row in con.execute("SELECT * FROM url_downloads").to_arrow_table().to_pylist():
                downloads.setdefault(row["source"], {})[row["image_id"]] = row
    table, stats = build_raw_index(spec, resolve_workers(spec.image.workers), context.log.info, downloads)
    skips = sorted(stats.counts.items())
    file_skips = sorted(stats.files.items())
    with dataset.db() as con:
        with transaction(con, "raw_index"):
            replace_table(con, "raw_index", table)
            replace_table(con, "scan_skips", scan_skips_table(stats))
        by_source = con.execute("SELECT source, count(*) FROM raw_index GROUP BY source ORDER BY source").fetchall()
    for reason, n in skips:
        context.log.warning(f"skipped {n} source member(s): {reason}")
    for reason, n in file_skips:
        context.log.warning(f"skipped {n} source file(s): {reason}")
    for line in stats.notes:
        context.log.warning(line)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows,
            "records_by_source": md_counts(by_source),
            "members_skipped": dict(skips),
            "source_files_skipped": dict(file_skips),
        }
    )


@dg.asset(group_name="ingest", deps=[raw_index], kinds={"duckdb"})
def filtered_images(dataset: DatasetResource) -> dg.MaterializeResult:
    """Exactly one decision per raw record: keep, or the reason it is skipped (too_small: no
    base resolution's nearest bucket can be filled without upsampling)."""
    spec = dataset.load()
    with dataset.db() as con:
        with transaction(con, "filtered_images"):
            apply_filters(con, spec.filters, bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible))
        counts = con.execute(
            "SELECT decision, count(*) FROM filtered_images GROUP BY decision ORDER BY count(*) DESC, decision"
        ).fetchall()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(n for _, n in counts),
            "kept": dict(counts).get("keep", 0),
            "decisions": md_counts(counts),
        }
    )
