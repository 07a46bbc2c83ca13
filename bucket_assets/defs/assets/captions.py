"""Stage 3: the caption table (every caption of every source) and the waterfall selection."""


import dagster as dg
import pyarrow as pa

from bucket_assets.core.captions import (
    CAPTION_SOURCES_SCHEMA,
    CaptionSourceError,
    caption_source_rows,
    discover_landing,
    landing_captions_sql,
    load_landing_source,
    select_captions_sql,
)
from bucket_assets.core.db import replace_table
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
    with dataset.db() as con:
        for name, parquet, meta in discover_landing(spec.captions.landing_dir):
            try:
                landing.append(load_landing_source(con, name, parquet, meta, spec.captions.selectors, spec.captions.max_chars))
            except CaptionSourceError as exc:
                rejected.append((name, str(exc)))
                context.log.error(f"rejected caption source: {exc}")
        inputs = [(s.name, s.kind, s.caption_variant) for s in spec.sources]
        rows = caption_source_rows(inputs, landing)
        ids = {(r["kind"], r["name"]): r["source_id"] for r in rows}
        replace_table(con, "caption_sources", pa.Table.from_pylist(rows, schema=CAPTION_SOURCES_SCHEMA))
        # Each input source's own captions; the first record of a (source, id) pair speaks for it.
        con.execute(
            """CREATE OR REPLACE TABLE captions AS
               SELECT r.image_id, s.source_id, s.variant, r.caption AS text,
                      CASE WHEN r.caption IS NULL OR r.caption = '' THEN 'empty' ELSE 'ok' END AS status,
                      r.notes AS flags
               FROM raw_index r JOIN caption_sources s ON s.kind = 'input' AND s.name = r.source
               QUALIFY row_number() OVER (PARTITION BY r.source, r.image_id ORDER BY r.row_id) = 1"""
        )
        unknown = {}
        for src in landing:
            params = {"path": src.parquet_path, "max_chars": spec.captions.max_chars,
                      "sid": ids[("landing", src.name)], "variant": src.variant}
            sql = landing_captions_sql(con, src)
            # One caption per image per source: the first row for an id wins.
            con.execute(
                f"""INSERT INTO captions
                    SELECT image_id, $sid, $variant, text, status, flags FROM ({sql})
                    QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY row_number) = 1""",
                params,
            )
            unknown[src.name] = con.execute(
                f"""SELECT count(*) FROM ({sql})
                    WHERE image_id NOT IN (SELECT image_id FROM raw_index)""",
                {"path": src.parquet_path, "max_chars": spec.captions.max_chars},
            ).fetchone()[0]
        replace_table(
            con,
            "rejected_caption_sources",
            pa.table({"name": [n for n, _ in rejected], "reason": [r for _, r in rejected]},
                     schema=pa.schema([("name", pa.string()), ("reason", pa.string())])),
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
            "rejected_sources": dict(rejected),
        }
    )


@dg.asset(group_name="captions", deps=[caption_table, bucket_assignments], kinds={"duckdb"})
def selected_captions(dataset: DatasetResource) -> dg.MaterializeResult:
    """One caption per bucketed image by the waterfall: first selector with an ok, non-empty
    caption; newest source within a selector; `missing` decides empty caption or drop."""
    spec = dataset.load()
    with dataset.db() as con:
        con.execute(
            """CREATE OR REPLACE TEMP VIEW wanted_images AS
               SELECT DISTINCT image_id FROM bucket_assignments WHERE status = 'ok'"""
        )
        con.execute(
            "CREATE OR REPLACE TABLE selected_captions AS " + select_captions_sql(),
            {"selectors": list(spec.captions.selectors), "missing": spec.captions.missing},
        )
        by_selector = con.execute(
            """SELECT coalesce(caption_variant, '(' || status || ')'), count(*) FROM selected_captions
               GROUP BY ALL ORDER BY count(*) DESC"""
        ).fetchall()
    return dg.MaterializeResult(
        metadata={"dagster/row_count": sum(n for _, n in by_selector), "by_variant": md_counts(by_selector)}
    )
