"""Stage 5: per-bucket shards, the manifest and the dataset card."""


from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from bucket_assets.core.accounting import summary
from bucket_assets.core.atomic import atomic_write_text, remove_stale_temps
from bucket_assets.core.buckets import bucket_table
from bucket_assets.core.captions import caption_warnings, rejected_sources
from bucket_assets.core.card import render_card
from bucket_assets.core.db import drop_other_partitions, table_exists
from bucket_assets.core.manifest import MANIFEST_NAME, build_manifest, dumps, same_content
from bucket_assets.core.pictures import CHART_NAME, PICTURES_STATE, SHEETS_DIR, sheet_path, write_pictures
from bucket_assets.core.processing import prune_gone_buckets
from bucket_assets.core.progress import Progress
from bucket_assets.core.publish import OutputDirError, claim_output_dir, publish, read_manifest
from bucket_assets.core.shard_writer import ShardWriter
from bucket_assets.defs.assets.captions import caption_table, selected_captions
from bucket_assets.defs.resources import ComputeResource, DatasetResource


def own_output_dir(output_dir: str) -> Path:
    """The output dir, once it is known to be ours to write (see core.publish)."""
    try:
        return claim_output_dir(output_dir)
    except OutputDirError as exc:
        raise dg.Failure(str(exc)) from None


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
        no image is decoded or encoded here (core/shard_writer.py). A bucket whose plan digest and
        shard files are what the last build recorded is not planned at all
        (run_buckets_unchanged); a changed bucket is planned from its first shard whose key range
        changed (run_buckets_resumed: the shards before it stand); the plan streams in batches, and a shard whose content
        fingerprint and published file are what the last build recorded is neither built nor read
        (run_shards_unchanged), the others are built (run_shards_built) and staged if their bytes
        changed; `export_manifest` publishes them together with the manifest that lists them."""
        spec = dataset.load()
        out_dir = own_output_dir(spec.output_dir)
        keys = list(context.partition_keys)
        writer = ShardWriter(out_dir, Path(spec.work_dir) / "tmp", dataset.db, spec.shards.max_samples,
                             spec.shards.max_bytes)
        progress: list[Progress] = []

        def start(n: int) -> None:  # progress counts the buckets planned that hold samples
            progress.append(Progress("bucket_shards: buckets written", n, context.log.info))

        run = writer.run(keys, context.run.run_id, compute.engine(1), on_start=start,
                         on_bucket=lambda _b: progress[0].advance())
        if progress:
            progress[0].close()
        context.log.info(f"{len(run.rows)} shard(s), {run.samples} samples in {run.buckets_with_samples} of "
                         f"{len(keys)} bucket(s): {run.buckets_unchanged} bucket(s) unchanged, {run.buckets_resumed} "
                         f"planned from their first changed shard, {run.unchanged} "
                         f"shard(s) unchanged (not read), {run.built} built; {run.rewritten} file(s) staged")
        # Each partition's materialization carries its own numbers; what is run-wide says so.
        per_bucket = run.by_bucket(keys)
        for bucket_id in keys:
            context.add_asset_metadata(bucket_partition_metadata(out_dir, bucket_id, per_bucket[bucket_id]),
                                       partition_key=bucket_id)
        return dg.MaterializeResult(
            metadata={
                "run_buckets": len(keys),
                "run_buckets_with_samples": run.buckets_with_samples,
                "run_buckets_unchanged": run.buckets_unchanged,
                "run_buckets_resumed": run.buckets_resumed,
                "run_shards": len(run.rows),
                "run_samples": run.samples,
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
