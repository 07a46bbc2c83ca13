"""Stage 3: the caption table (every caption of every source) and the waterfall selection."""


import dagster as dg
import pyarrow as pa

from bucket_assets.core.captions import (
    CaptionSourceError,
    build_caption_table,
    caption_warnings,
    discover_landing,
    load_landing_source,
    printable,
    select_captions,
)
from bucket_assets.core.db import replace_table, transaction
from bucket_assets.defs.assets.assignment import bucket_assignments
from bucket_assets.defs.assets.ingest import raw_index
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import DatasetResource

CAPTIONS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source_id", pa.int32()), ("variant", pa.string()),
     ("text", pa.string()), ("status", pa.string()), ("flags", pa.string())]
)


@dg.asset(group_name="captions", deps=[raw_index], kinds={"duckdb"})
def caption_table(context: dg.AssetExecutionContext, dataset: DatasetResource) -> dg.MaterializeResult:
    """Caption sources (id, variant, backend, model, created_at, prompt hashes, file) and every
    caption: each input source's own text under its caption_variant, plus each complete
    `<name>.parquet` + `<name>.json` pair in the landing directory."""
    spec = dataset.load()
    landing, rejected = [], []
    try:
        pairs = discover_landing(spec.captions.landing_dir)
    except CaptionSourceError as exc:  # the directory itself, not one source: building on would drop every landed caption
        raise dg.Failure(description=str(exc)) from None
    with dataset.db() as con:
        for name, parquet, meta in pairs:
            # load_landing_source raises only CaptionSourceError, whatever the pair is or holds.
            try:
                landing.append(load_landing_source(con, name, parquet, meta, spec.captions.selectors, spec.captions.max_chars))
            except CaptionSourceError as exc:
                rejected.append((printable(name), str(exc), exc.variant))  # the name may not be valid UTF-8
                context.log.error(f"rejected caption source: {exc}")
        inputs = [(s.name, s.kind, s.caption_variant) for s in spec.sources]
        with transaction(con, "captions"):
            rows, unknown = build_caption_table(con, inputs, landing, spec.captions.max_chars)
            replace_table(
                con,
                "rejected_caption_sources",
                pa.table({"name": [r[0] for r in rejected], "reason": [r[1] for r in rejected],
                          "variant": [r[2] for r in rejected]},
                         schema=pa.schema([("name", pa.string()), ("reason", pa.string()), ("variant", pa.string())])),
            )
        per_variant = con.execute(
            "SELECT variant, count(*) FROM captions WHERE status = 'ok' GROUP BY variant ORDER BY variant"
        ).fetchall()
        total = con.execute("SELECT count(*) FROM captions").fetchone()[0]
    for name, n in unknown.items():
        if n:
            context.log.warning(f"caption source {name}: {n} caption(s) name image ids not in the raw index")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "sources": dg.MetadataValue.md(
                "\n".join(["| id | name | variant | model |", "| --- | --- | --- | --- |"]
                          + [f"| {r['source_id']} | {r['name']} | {r['variant']} | {r['model']} |" for r in rows])
            ),
            "ok_captions_by_variant": md_counts(per_variant),
            "unknown_image_ids": unknown,
            "rejected_sources": {r[0]: r[1] for r in rejected},
        }
    )


@dg.asset(group_name="captions", deps=[caption_table, bucket_assignments], kinds={"duckdb"})
def selected_captions(context: dg.AssetExecutionContext, dataset: DatasetResource) -> dg.MaterializeResult:
    """One caption per bucketed image by the waterfall: first selector with an ok, non-empty
    caption; newest source within a selector; `missing` decides empty caption or drop."""
    spec = dataset.load()
    with dataset.db() as con:
        built = select_captions(con, list(spec.captions.selectors), spec.captions.missing)
        by_selector = con.execute(
            """SELECT coalesce(caption_variant, '(' || status || ')'), count(*) FROM selected_captions
               GROUP BY ALL ORDER BY count(*) DESC"""
        ).fetchall()
        warnings = caption_warnings(con, list(spec.captions.selectors))
    for w in warnings:
        context.log.warning(w)
    return dg.MaterializeResult(
        metadata={"dagster/row_count": sum(n for _, n in by_selector), "by_variant": md_counts(by_selector),
                  "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in warnings) or "none"),
                  "rebuilt": built}
    )
