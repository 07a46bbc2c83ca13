"""Stage 1: raw index and filter decisions."""


import dagster as dg

from bucket_assets.core.buckets import bucket_table
from bucket_assets.core.filters import apply_filters
from bucket_assets.core.parallel import resolve_workers
from bucket_assets.core.publish import output_dir_problem
from bucket_assets.core.scan_cache import ScanCache
from bucket_assets.defs.assets.downloads import url_downloads
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import ComputeResource, DatasetResource
from bucket_assets.spec import check_paths


@dg.asset(group_name="ingest", deps=[url_downloads], kinds={"duckdb"})
def raw_index(context: dg.AssetExecutionContext, dataset: DatasetResource, compute: ComputeResource) -> dg.MaterializeResult:
    """One row per source record: where its bytes are, sha256, EXIF-corrected size, format, and
    the source's caption and metadata (url, similarity, NSFW tag, license). Only source files
    and directories that changed since the last build are scanned again (core/scan_cache.py)."""
    spec = dataset.load()
    check_paths(spec)
    problem = output_dir_problem(spec.output_dir)
    if problem:
        raise dg.Failure(problem)
    engine = compute.engine(resolve_workers(spec.image.workers))
    out = ScanCache(spec, engine, context.log.info).build(dataset.db)
    with dataset.db() as con:
        by_source = con.execute("SELECT source, count(*) FROM raw_index GROUP BY source ORDER BY source").fetchall()
    skips, file_skips = sorted(out.stats.counts.items()), sorted(out.stats.files.items())
    context.log.info(f"scan units: {out.units_scanned} scanned ({out.parts_scanned} parts), {out.units_reused} reused, "
                     f"{out.units_removed} removed")
    for reason, n in skips:
        context.log.warning(f"skipped {n} source member(s): {reason}")
    for reason, n in file_skips:
        context.log.warning(f"skipped {n} source file(s): {reason}")
    for line in out.stats.notes:
        context.log.warning(line)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.rows,
            "records_by_source": md_counts(by_source),
            "members_skipped": dict(skips),
            "source_files_skipped": dict(file_skips),
            "units_scanned": out.units_scanned,
            "units_reused": out.units_reused,
            "units_removed": out.units_removed,
            "parts_scanned": out.parts_scanned,
            "units_changed_while_scanned": out.units_changed_while_scanned,
        }
    )


@dg.asset(group_name="ingest", deps=[raw_index], kinds={"duckdb"})
def filtered_images(dataset: DatasetResource) -> dg.MaterializeResult:
    """Exactly one decision per raw record: keep, or the reason it is skipped (too_small: no
    base resolution's nearest bucket can be filled without upsampling)."""
    spec = dataset.load()
    with dataset.db() as con:
        built = apply_filters(con, spec.filters, bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible))
        counts = con.execute(
            "SELECT decision, count(*) FROM filtered_images GROUP BY decision ORDER BY count(*) DESC, decision"
        ).fetchall()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(n for _, n in counts),
            "kept": dict(counts).get("keep", 0),
            "decisions": md_counts(counts),
            "rebuilt": built,
        }
    )
