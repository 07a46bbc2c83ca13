"""Stage 5: per-bucket shards, the manifest and the dataset card."""


import collections
import dataclasses
import itertools
import operator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import dagster as dg
import pyarrow as pa

from bucket_assets.core.accounting import summary
from bucket_assets.core.atomic import atomic_write_bytes, atomic_write_text, remove_stale_temps
from bucket_assets.core.buckets import bucket_table
from bucket_assets.core.captions import caption_warnings, rejected_sources
from bucket_assets.core.card import render_card
from bucket_assets.core.db import drop_other_partitions, replace_partitions, table_exists, transaction
from bucket_assets.core.manifest import MANIFEST_NAME, build_manifest, dumps, same_content
from bucket_assets.core.processing import prune_gone_buckets
from bucket_assets.core.pictures import CHART_NAME, SHEETS_DIR, bucket_chart_png, contact_sheet_png, first_samples, sheet_path
from bucket_assets.core.progress import Progress
from bucket_assets.core.publish import (
    BUCKET_DIR_RE,
    DIFFERENT,
    UNCHANGED,
    OutputDirError,
    claim_output_dir,
    file_identity,
    publish,
    read_manifest,
    shard_state,
    staged_path,
    staging_dir,
)
from bucket_assets.core.shards import PlannedShard, iter_sample_plan, plan_bucket_shards, write_sample_plan
from bucket_assets.distributed import LocalCompute
from bucket_assets.defs.assets.captions import caption_table, selected_captions
from bucket_assets.defs.resources import ComputeResource, DatasetResource

# One row per shard: where it is and what it holds (the manifest lists these), its content
# fingerprint and the key range it covers, and the identity (size, mtime_ns, inode) of the file
# the build left for it, so the next build skips it while both still hold (core.publish.shard_state).
SHARD_FILES_SCHEMA = pa.schema(
    [("bucket_id", pa.string()), ("shard_index", pa.int32()), ("path", pa.string()),
     ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
     ("fingerprint", pa.string()), ("first_key", pa.string()), ("last_key", pa.string()),
     ("file_size", pa.int64()), ("mtime_ns", pa.int64()), ("inode", pa.uint64())]
)
# What each written sample holds of its caption, so a sensor can tell which buckets a new
# caption selection changes without opening a shard. Derived in SQL from the run's sample plan
# and the shards' key ranges.
SHARD_SAMPLES_COLUMNS = (
    ("bucket_id", "VARCHAR"), ("shard_index", "INTEGER"), ("key", "VARCHAR"), ("image_id", "VARCHAR"),
    ("text", "VARCHAR"), ("caption_variant", "VARCHAR"), ("caption_selector_index", "INTEGER"),
    ("caption_source_id", "INTEGER"),
)
SHARD_SAMPLES_SQL = """
INSERT INTO shard_samples BY NAME
SELECT p.bucket_id, f.shard_index, p.key, p.image_id, p.text, p.caption_variant,
       CAST(p.caption_selector_index AS INTEGER) AS caption_selector_index,
       CAST(p.caption_source_id AS INTEGER) AS caption_source_id
FROM read_parquet($plan) p
JOIN shard_files f ON f.bucket_id = p.bucket_id AND p.key >= f.first_key AND p.key <= f.last_key
WHERE list_contains($buckets, p.bucket_id)
ORDER BY p.bucket_id, p.key
"""


def own_output_dir(output_dir: str) -> Path:
    """The output dir, once it is known to be ours to write (see core.publish)."""
    try:
        return claim_output_dir(output_dir)
    except OutputDirError as exc:
        raise dg.Failure(str(exc)) from None


@dataclass
class ShardRun:
    """What write_buckets did: a row per shard (SHARD_FILES_SCHEMA), bounded by the shard count."""

    rows: list[dict] = field(default_factory=list)
    unchanged: int = 0  # skipped by fingerprint: neither built nor read
    built: int = 0  # assembled, compared with the published file unless known to differ, staged if changed
    rewritten: int = 0  # files staged


def _shard_row(bucket_id: str, shard: PlannedShard, samples: int, nbytes: int, sha256: str,
               ident: tuple[int, int, int] | None) -> dict:
    size, mtime_ns, inode = ident or (None, None, None)
    return {"bucket_id": bucket_id, "shard_index": shard.index, "path": shard.rel, "samples": samples,
            "bytes": nbytes, "sha256": sha256, "fingerprint": shard.fingerprint, "first_key": shard.first_key,
            "last_key": shard.last_key, "file_size": size, "mtime_ns": mtime_ns, "inode": inode}


def write_buckets(out_dir: Path, bucket_ids: list[str], plan_rows: Iterable[dict], recorded: dict[tuple[str, int], dict],
                  max_samples: int, max_bytes: int, compute=None,
                  on_bucket: Callable[[str], None] | None = None) -> ShardRun:
    """Stage the shards of these buckets from their sample plan rows (streamed in bucket, key
    order). Each bucket's rows are split into shards as they go by (core.shards.plan_bucket_shards);
    a shard whose content fingerprint and published file are those `recorded` by the last build
    ((bucket_id, shard_index) -> shard_files row) is skipped without reading anything. Every other
    shard is one task (`compute`: in process, or Celery workers) that reads its JPEG bytes from the
    store and stages it unless the published file already holds the same bytes. Tasks are made
    lazily, so memory holds the shards in flight, not the buckets. `on_bucket(bucket_id)` is
    called once a bucket's shards are all planned."""
    run = ShardRun()
    pending: collections.deque = collections.deque()
    wanted, seen = set(bucket_ids), set()

    def clear_temps(bucket_id: str) -> None:
        remove_stale_temps(staging_dir(out_dir) / "buckets" / bucket_id)

    def plans() -> Iterator[dict]:
        for bucket_id, rows in itertools.groupby(plan_rows, key=operator.itemgetter("bucket_id")):
            if bucket_id in seen or bucket_id not in wanted:
                raise ValueError(f"sample plan: bucket {bucket_id} out of order or not requested")
            seen.add(bucket_id)
            clear_temps(bucket_id)
            for shard in plan_bucket_shards(rows, bucket_id, max_samples, max_bytes):
                prev = recorded.get((bucket_id, shard.index))
                ident = file_identity(out_dir / shard.rel)
                state = shard_state(shard.fingerprint, shard.rel, shard.file_bytes, prev, ident)
                if state == UNCHANGED:
                    run.rows.append(_shard_row(bucket_id, shard, prev["samples"], prev["bytes"], prev["sha256"], ident))
                    run.unchanged += 1
                    continue
                pending.append((bucket_id, dataclasses.replace(shard, samples=[])))
                yield {"out_dir": str(out_dir), "rel": shard.rel, "samples": shard.samples,
                       "known_different": state == DIFFERENT}
            if on_bucket is not None:
                on_bucket(bucket_id)
        for bucket_id in bucket_ids:
            if bucket_id not in seen:
                clear_temps(bucket_id)  # an empty bucket: nothing to stage

    for res in (compute or LocalCompute(1)).map("shard", plans()):
        bucket_id, shard = pending.popleft()
        run.built += 1
        run.rewritten += res["rewritten"]
        # The file the manifest publish will leave at shard.rel: the staged one is renamed there.
        ident = file_identity(staged_path(out_dir, shard.rel, res["sha256"]) if res["rewritten"] else out_dir / shard.rel)
        run.rows.append(_shard_row(bucket_id, shard, res["samples"], res["bytes"], res["sha256"], ident))
    run.rows.sort(key=lambda r: (r["bucket_id"], r["shard_index"]))
    return run


def recorded_shards(con, bucket_ids: list[str]) -> dict[tuple[str, int], dict]:
    """The shard_files rows of these buckets (one per shard) by (bucket_id, shard_index); rows of
    a work dir from before fingerprints lack those columns, so their shards are compared once."""
    if not table_exists(con, "shard_files"):
        return {}
    rows = con.execute("SELECT * FROM shard_files WHERE list_contains(?, bucket_id)", [bucket_ids]).to_arrow_table()
    return {(r["bucket_id"], r["shard_index"]): r for r in rows.to_pylist()}


def shards_as_recorded(con, bucket_ids: list[str], run: ShardRun, recorded: dict[tuple[str, int], dict]) -> bool:
    """Whether these buckets' shard_files and shard_samples rows already say what `run` would
    record, so neither is rewritten: every shard was skipped as unchanged (its content
    fingerprint covers each sample's key, .txt and .json, so its shard_samples rows too), the
    new shard_files rows equal the recorded ones, and shard_samples holds as many rows of these
    buckets as the shards hold samples."""
    if run.built or len(run.rows) != len(recorded) or not table_exists(con, "shard_samples"):
        return False
    names = SHARD_FILES_SCHEMA.names
    for r in run.rows:
        prev = recorded.get((r["bucket_id"], r["shard_index"]))
        if prev is None or any(prev.get(c) != r.get(c) for c in names):
            return False
    n = con.execute("SELECT count(*) FROM shard_samples WHERE list_contains(?, bucket_id)", [bucket_ids]).fetchone()[0]
    return n == sum(r["samples"] for r in run.rows)


def record_shards(con, bucket_ids: list[str], rows: list[dict], plan: Path | None) -> int:
    """Replace these buckets' shard_files and shard_samples rows in one transaction; shard_samples
    come from the plan file joined with the shards' key ranges. Returns the samples recorded."""
    with transaction(con, "shard_files"):
        replace_partitions(con, "shard_files", pa.Table.from_pylist(rows, schema=SHARD_FILES_SCHEMA), bucket_ids)
        if not table_exists(con, "shard_samples"):
            con.execute(f"CREATE TABLE shard_samples ({', '.join(f'{c} {t}' for c, t in SHARD_SAMPLES_COLUMNS)})")
        have = {r[0] for r in con.execute("DESCRIBE shard_samples").fetchall()}
        for c, t in SHARD_SAMPLES_COLUMNS:  # a work dir from an older version
            if c not in have:
                con.execute(f"ALTER TABLE shard_samples ADD COLUMN {c} {t}")
        con.execute("DELETE FROM shard_samples WHERE list_contains(?, bucket_id)", [bucket_ids])
        n = 0
        if plan is not None and rows:
            n = con.execute(SHARD_SAMPLES_SQL, {"plan": str(plan), "buckets": bucket_ids}).fetchone()[0]
        if n != sum(r["samples"] for r in rows):
            raise RuntimeError(f"shard_samples: {n} rows for {sum(r['samples'] for r in rows)} samples in shards")
    return n


def bucket_partition_metadata(out_dir: Path, bucket_id: str, shard_rows: list[dict]) -> dict:
    """What one bucket partition of `bucket_shards` holds, for its own page in the UI."""
    samples = sum(r["samples"] for r in shard_rows)
    if not shard_rows:
        return {"samples": 0, "shards": 0, "bytes": 0, "status": "empty: no sample is assigned to this bucket"}
    return {
        "samples": samples,
        "shards": len(shard_rows),
        "bytes": sum(r["bytes"] for r in shard_rows),
        "status": f"{samples:,} samples in {len(shard_rows)} shard(s)",
        "files": dg.MetadataValue.md("\n".join(f"- `{out_dir / r['path']}`" for r in shard_rows)),
        "preview": dg.MetadataValue.path(str(out_dir / sheet_path(bucket_id))),
    }


def bucket_shards_asset(partitions: dg.PartitionsDefinition, processed_images: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="bucket_shards",
        group_name="export",
        deps=[processed_images, selected_captions],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"webdataset"},
    )
    def bucket_shards(
        context: dg.AssetExecutionContext, dataset: DatasetResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        """`buckets/<bucket_id>/shard-NNNNNN.tar`: uncompressed USTAR, <key>.jpg/.txt/.json per
        sample, sorted by key, split by shards.max_samples / max_bytes. Reads stored JPEG bytes:
        no image is decoded or encoded here. The plan streams in batches; a shard whose content
        fingerprint and published file are what the last build recorded is neither built nor read
        (run_shards_unchanged), the others are built (run_shards_built) and staged if their bytes
        changed; `export_manifest` publishes them together with the manifest that lists them."""
        spec = dataset.load()
        out_dir = own_output_dir(spec.output_dir)
        keys = list(context.partition_keys)
        plan = Path(spec.work_dir) / "tmp" / f"sample-plan-{context.run.run_id}.parquet"
        filled: list[str] = []
        with dataset.db() as con:
            # One query for every requested bucket, spilled to a file so the DB lock is not
            # held while shards are written; what the last build recorded of their shards.
            has_plan = table_exists(con, "processed_images")
            if has_plan:
                write_sample_plan(con, keys, plan)
                filled = [r[0] for r in con.execute(
                    "SELECT DISTINCT bucket_id FROM read_parquet(?) ORDER BY 1", [str(plan)]).fetchall()]
            recorded = recorded_shards(con, keys)
        # Progress counts the buckets that hold samples; an empty one writes nothing.
        progress = Progress("bucket_shards: buckets written", len(filled), context.log.info)
        try:
            run = write_buckets(out_dir, keys, iter_sample_plan(plan) if has_plan else iter(()), recorded,
                                spec.shards.max_samples, spec.shards.max_bytes, compute.engine(1),
                                on_bucket=lambda _b: progress.advance())
            progress.close()
            with dataset.db() as con:
                if shards_as_recorded(con, keys, run, recorded):
                    n_samples = sum(r["samples"] for r in run.rows)  # a no-op: nothing to rewrite
                else:
                    n_samples = record_shards(con, keys, run.rows, plan if has_plan else None)
        finally:
            plan.unlink(missing_ok=True)
        per_bucket: dict[str, list[dict]] = {b: [] for b in keys}
        for r in run.rows:
            per_bucket[r["bucket_id"]].append(r)
        context.log.info(f"{len(run.rows)} shard(s), {n_samples} samples in {len(filled)} of {len(keys)} bucket(s): "
                         f"{run.unchanged} unchanged (not read), {run.built} built; {run.rewritten} file(s) staged")
        # Each partition's materialization carries its own numbers; what is run-wide says so.
        for bucket_id in keys:
            context.add_asset_metadata(bucket_partition_metadata(out_dir, bucket_id, per_bucket[bucket_id]),
                                       partition_key=bucket_id)
        return dg.MaterializeResult(
            metadata={
                "run_buckets": len(keys),
                "run_buckets_with_samples": len(filled),
                "run_shards": len(run.rows),
                "run_samples": n_samples,
                "run_bytes": sum(r["bytes"] for r in run.rows),
                "run_files_rewritten": run.rewritten,
                "run_shards_unchanged": run.unchanged,
                "run_shards_built": run.built,
            }
        )

    return bucket_shards


def export_manifest_asset(bucket_shards: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(name="export_manifest", group_name="export", deps=[bucket_shards, caption_table], kinds={"json"})
    def export_manifest(context: dg.AssetExecutionContext, dataset: DatasetResource) -> dg.MaterializeResult:
        """`manifest.json`: format, preprocessing, buckets with shards (path, samples, bytes,
        sha256), caption sources, selectors and the export summary."""
        spec = dataset.load()
        with dataset.db() as con:
            for t in ("shard_files", "shard_samples", "processed_images"):
                if not table_exists(con, t):
                    raise dg.Failure(f"{t} does not exist yet: materialize processed_images and bucket_shards first")
            ids = [b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)]
            gone = drop_other_partitions(con, ["shard_files", "shard_samples", "processed_images"], ids)
            if gone:
                context.log.info(f"dropped {gone} row(s) of buckets the spec no longer has")
        # With the rows gone, their stored JPEGs go too (the DB lock is not needed for that).
        removed = prune_gone_buckets(spec.processed_dir, set(ids))
        if removed:
            context.log.info(f"removed the store of {len(removed)} bucket(s) the spec no longer has")
        with dataset.db() as con:
            shard_rows = con.execute(
                "SELECT bucket_id, path, samples, bytes, sha256 FROM shard_files ORDER BY bucket_id, shard_index"
            ).fetchall()
            sources = con.execute(
                "SELECT * EXCLUDE (fingerprint) FROM caption_sources ORDER BY source_id"
            ).to_arrow_table().to_pylist()
            usage = dict(con.execute(
                """SELECT sc.caption_selector_index, count(DISTINCT sc.image_id) FROM shard_samples s
                   JOIN selected_captions sc USING (image_id)
                   WHERE sc.caption_selector_index IS NOT NULL GROUP BY ALL"""
            ).fetchall())
            variants = dict(con.execute(
                """SELECT c.variant, count(DISTINCT c.image_id) FROM captions c
                   WHERE c.status = 'ok' AND length(trim(c.text)) > 0
                     AND c.image_id IN (SELECT image_id FROM shard_samples) GROUP BY ALL"""
            ).fetchall())
            scan_skips = dict(con.execute("SELECT reason, count FROM scan_skips WHERE scope = 'member'").fetchall())
            file_skips = dict(con.execute("SELECT reason, count FROM scan_skips WHERE scope = 'file'").fetchall())
            summ = summary(con, scan_skips, file_skips)
            summ["caption_sources_used"] = [
                {"caption_source_id": sid, "name": name, "variant": variant, "samples": int(n)}
                for sid, name, variant, n in con.execute(
                    """SELECT s.caption_source_id, c.name, c.variant, count(*) FROM shard_samples s
                       LEFT JOIN caption_sources c ON c.source_id = s.caption_source_id
                       GROUP BY ALL ORDER BY s.caption_source_id NULLS LAST"""
                ).fetchall()
            ]
            warnings = caption_warnings(con, list(spec.captions.selectors))
            rejected = [{"name": r["name"], "reason": r["reason"]} for r in rejected_sources(con)]
        for w in warnings:
            context.log.warning(w)
        by_bucket: dict[str, list[dict]] = {}
        for bucket_id, path, samples, nbytes, sha in shard_rows:
            by_bucket.setdefault(bucket_id, []).append({"path": path, "samples": samples, "bytes": nbytes, "sha256": sha})
        for s in sources:
            s["caption_source_id"] = s.pop("source_id")
        manifest = build_manifest(
            spec=spec,
            buckets=bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible),
            shards_by_bucket=by_bucket,
            caption_sources=sources,
            selector_usage=usage,
            variant_counts=variants,
            summary=summ,
            created=datetime.now(timezone.utc).isoformat(),
            rejected_caption_sources=rejected,
            warnings=warnings,
        )
        path = own_output_dir(spec.output_dir) / MANIFEST_NAME
        remove_stale_temps(path.parent, recursive=False)  # a killed run's manifest or card temp
        old = read_manifest(path)  # None when missing or corrupt: a corrupt one is replaced
        if old is None and path.exists():
            context.log.warning(f"{path} is not a readable bucketed_shards_v1 manifest; it is replaced")
        listed = [(rel, sha) for _bucket, rel, _n, _bytes, sha in shard_rows]
        if old is not None and same_content(old, manifest):
            manifest = old  # nothing changed: keep the file (and its `created`) as it is
            moved = publish(spec.output_dir, listed, MANIFEST_NAME, None)
            context.log.info("manifest unchanged")
        else:
            moved = publish(spec.output_dir, listed, MANIFEST_NAME, dumps(manifest))
        context.log.info(f"published: {moved} new shard file(s) moved into place")
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "export_id": manifest["export_id"],
                "buckets": len(manifest["buckets"]),
                "summary": dg.MetadataValue.json(summ),
            }
        )

    return export_manifest


# Bump when the chart or a contact sheet is drawn differently from the same inputs: every
# picture recorded in the pictures state is then drawn again.
PICTURES_VERSION = 1
PICTURES_STATE = "card_pictures.json"


def _picture_key(*parts) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([PICTURES_VERSION, *parts], sort_keys=True).encode()).hexdigest()


def write_pictures(out: Path, manifest: dict, per_bucket: int = 8, state_path: Path | None = None) -> int:
    """The chart and one contact sheet per bucket next to the card; unchanged files are left
    alone and sheets of buckets no longer exported removed. Returns files written.

    With `state_path` (a JSON file in the work dir), each picture's inputs are recorded with
    the identity (size, mtime_ns, inode) of the file written: a picture whose inputs (the chart:
    the manifest's content; a sheet: its title and its bucket's shard paths and sha256) and file
    are those recorded is not drawn again, so a no-op build opens no shard and skips matplotlib.
    A missing or unreadable state just means every picture is drawn and compared."""
    import json

    written = 0
    old: dict = {}
    if state_path is not None:
        try:
            old = json.loads(state_path.read_text(encoding="utf-8"))
            old = old if isinstance(old, dict) and old.get("version") == PICTURES_VERSION else {}
        except (OSError, ValueError):
            old = {}
    new: dict[str, dict] = {}

    def put(path: Path, key: str, draw: Callable[[], bytes]) -> None:
        nonlocal written
        rel = str(path.relative_to(out))
        prev = (old.get("files") or {}).get(rel)
        ident = file_identity(path)
        if not (isinstance(prev, dict) and prev.get("key") == key and ident is not None
                and list(ident) == prev.get("ident")):
            data = draw()
            if not path.is_file() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
                written += 1
            ident = file_identity(path)
        new[rel] = {"key": key, "ident": list(ident) if ident is not None else None}

    chart_input = {k: v for k, v in manifest.items() if k != "created"}
    put(out / CHART_NAME, _picture_key("chart", chart_input), lambda: bucket_chart_png(manifest))
    keep = set()
    for bucket_id, b in manifest["buckets"].items():
        shards = [(sh["path"], sh["sha256"]) for sh in b["shards"]]
        title = f"{bucket_id}: {b['scaled']['w']}x{b['scaled']['h']}, {b['count']} samples"
        keep.add(out / sheet_path(bucket_id))
        put(out / sheet_path(bucket_id), _picture_key("sheet", title, per_bucket, shards),
            lambda shards=shards, title=title: contact_sheet_png(
                first_samples([out / rel for rel, _ in shards], per_bucket), title))
    sheets = out / SHEETS_DIR
    if sheets.is_dir():
        remove_stale_temps(sheets)
        for p in sheets.iterdir():
            # Only sheets of our own naming: any other file there is the user's.
            if p not in keep and p.suffix == ".png" and BUCKET_DIR_RE.match(p.stem) and p.is_file():
                p.unlink()
    if state_path is not None and new != old.get("files"):
        state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps({"version": PICTURES_VERSION, "files": new}, sort_keys=True))
    return written


def dataset_card_asset(export_manifest: dg.AssetsDefinition) -> dg.AssetsDefinition:
    @dg.asset(name="dataset_card", group_name="export", deps=[export_manifest], kinds={"markdown"})
    def dataset_card(dataset: DatasetResource) -> dg.MaterializeResult:
        """The export's README.md, shaped like the seed dataset card."""
        spec = dataset.load()
        out = own_output_dir(spec.output_dir)
        manifest = read_manifest(out / MANIFEST_NAME)
        if manifest is None:
            raise dg.Failure(f"{out / MANIFEST_NAME} is missing or unreadable: materialize export_manifest first")
        written = write_pictures(out, manifest, state_path=Path(spec.work_dir) / PICTURES_STATE)
        card = render_card(manifest, pictures=True)
        path = out / "README.md"
        if not path.is_file() or path.read_text(encoding="utf-8") != card:
            atomic_write_text(path, card)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "chart": dg.MetadataValue.path(str(out / CHART_NAME)),
                "contact_sheets": dg.MetadataValue.path(str(out / SHEETS_DIR)),
                "pictures_rewritten": written,
                "card": dg.MetadataValue.md(card),
            }
        )

    return dataset_card
