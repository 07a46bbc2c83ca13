"""Stage 0: URL sources fetched into the work dir's content-addressed store."""

from collections import Counter
from functools import partial

import dagster as dg
import pyarrow as pa

from bucket_assets.core.db import replace_table, table_exists, transaction
from bucket_assets.core.download import DownloadSettings, download_all, journal_path, pending, read_journal
from bucket_assets.core.progress import Progress
from bucket_assets.core.sources.urls import url_requests
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import ComputeResource, DatasetResource
from bucket_assets.distributed import CeleryCompute
from bucket_assets.spec import UrlSource, check_paths

URL_DOWNLOADS_SCHEMA = pa.schema(
    [
        ("source", pa.string()), ("image_id", pa.string()), ("url", pa.string()), ("status", pa.string()),
        ("detail", pa.string()), ("http_status", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
        ("content_type", pa.string()), ("attempts", pa.int32()), ("final_url", pa.string()),
    ]
)


def settings_for(source: UrlSource) -> DownloadSettings:
    return DownloadSettings(**source.download.model_dump())


def _fetch_on_workers(engine: CeleryCompute, store, settings: DownloadSettings, todo: list[tuple[str, str]]):
    return engine.map("fetch", [(iid, url, str(store), settings) for iid, url in todo])


@dg.asset(group_name="ingest", kinds={"duckdb"})
def url_downloads(context: dg.AssetExecutionContext, dataset: DatasetResource, compute: ComputeResource) -> dg.MaterializeResult:
    """One row per URL of every `urls` source: ok with the sha256 of the bytes stored under
    `work_dir/downloads/`, or the reason it could not be fetched (http_404, timeout, too_large,
    not_an_image, ...). A rerun fetches only URLs with no result or a retryable failure."""
    spec = dataset.load()
    check_paths(spec)
    sources = [s for s in spec.sources if isinstance(s, UrlSource)]
    store = spec.downloads_dir
    previous: dict[str, dict[str, dict]] = {s.name: {} for s in sources}
    if sources:
        with dataset.db() as con:
            if table_exists(con, "url_downloads"):
                for row in con.execute("SELECT * FROM url_downloads").to_arrow_table().to_pylist():
                    previous.setdefault(row["source"], {})[row["image_id"]] = row
    rows, fetched_counts = [], {}
    for src in sources:
        journal = journal_path(store, src.name)
        prev = previous[src.name]
        for (image_id, _url), row in read_journal(journal).items():  # results a killed run fetched
            prev[image_id] = row
        items = list(url_requests(src))
        settings = settings_for(src)
        todo = pending(items, prev, store)
        context.log.info(f"source {src.name}: {len(items)} URLs; fetching {len(todo)}, reusing {len(items) - len(todo)}")
        progress = Progress(f"url_downloads: {src.name} URLs fetched", len(todo), context.log.info)
        engine = compute.engine(1)
        remote = partial(_fetch_on_workers, engine, store, settings) if isinstance(engine, CeleryCompute) else None
        got = download_all(items, store, settings, prev, journal, on_fetched=lambda _row: progress.advance(),
                           fetch_many=remote, todo=todo)
        progress.close()
        fetched_counts[src.name] = len(todo)
        rows += [{"source": src.name, **{k: r.get(k) for k in URL_DOWNLOADS_SCHEMA.names if k != "source"}} for r in got]
    table = pa.Table.from_pylist(rows, schema=URL_DOWNLOADS_SCHEMA)
    with dataset.db() as con:
        with transaction(con, "url_downloads"):
            replace_table(con, "url_downloads", table)
    for src in sources:
        journal_path(store, src.name).unlink(missing_ok=True)
    statuses = Counter(r["status"] for r in rows)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            "fetched": sum(fetched_counts.values()),
            "reused": len(rows) - sum(fetched_counts.values()),
            "bytes_stored": sum(r["bytes"] or 0 for r in rows if r["status"] == "ok"),
            "statuses": md_counts(sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
    )
