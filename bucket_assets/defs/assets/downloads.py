"""Stage 0: URL sources fetched into the work dir's content-addressed store."""

from pathlib import Path

import dagster as dg

from bucket_assets.core.url_downloads import download_run
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import ComputeResource, DatasetResource
from bucket_assets.distributed import CeleryCompute
from bucket_assets.spec import UrlSource, check_paths


@dg.asset(group_name="ingest", kinds={"duckdb"})
def url_downloads(context: dg.AssetExecutionContext, dataset: DatasetResource, compute: ComputeResource) -> dg.MaterializeResult:
    """One row per URL of every `urls` source: ok with the sha256 of the bytes stored under
    `work_dir/downloads/`, or the reason it could not be fetched (http_404, timeout, too_large,
    not_an_image, ...). A rerun fetches only URLs with no result or a retryable failure
    (core/url_downloads.py)."""
    spec = dataset.load()
    check_paths(spec)
    sources = [s for s in spec.sources if isinstance(s, UrlSource)]
    engine = compute.engine(1)
    with download_run(sources, spec.downloads_dir, Path(spec.work_dir) / "tmp", dataset.db) as run:
        for p in run.planned:
            context.log.info(f"source {p.name}: {p.urls} URLs; fetching {p.fetch}, reusing {p.urls - p.fetch}")
        # This machine fetches on threads (its process pool has nothing to add to I/O).
        run.fetch(context.log.info, engine if isinstance(engine, CeleryCompute) else None)
        done = run.commit()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": done.rows,
            "fetched": done.fetched,
            "reused": done.reused,
            "bytes_stored": done.bytes_stored,
            "statuses": md_counts(list(done.statuses)),
        }
    )
