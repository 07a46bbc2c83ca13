"""Stage 4: processed images, partitioned by bucket (decode, resize, crop, encode, store)."""


from pathlib import Path

import dagster as dg

from bucket_assets.core.parallel import resolve_workers
from bucket_assets.core.processing import RenderParams
from bucket_assets.core.store import ImageStore
from bucket_assets.defs.assets.assignment import bucket_assignments
from bucket_assets.defs.metadata import md_counts
from bucket_assets.defs.resources import ComputeResource, DatasetResource


def processed_images_asset(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="processed_images",
        group_name="images",
        deps=[bucket_assignments],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"torch", "pillow"},
    )
    def processed_images(
        context: dg.AssetExecutionContext, dataset: DatasetResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        """Each planned sample of the bucket rendered once to its final JPEG bytes in the store
        (append-only packs under `work_dir/processed/<bucket>/`); unchanged samples are not
        rendered again (core/store.py)."""
        spec = dataset.load()
        buckets = list(context.partition_keys)
        params = RenderParams(
            spec.image.mode, spec.image.jpeg.quality, spec.image.jpeg.subsampling,
            spec.image.jpeg.adaptive_threshold, spec.image.max_pixels,
            spec.filters.blank_std_threshold if spec.filters.drop_blank else None,
            spec.image.dct_downscale,
        )
        workers = resolve_workers(spec.image.workers)
        store = ImageStore(spec.processed_dir, Path(spec.work_dir) / "tmp", dataset.db)
        with store.run(buckets, params, token=context.run.run_id) as run:
            context.log.info(f"{run.samples} samples in {len(buckets)} bucket(s); rendering {run.to_render}, "
                             f"reusing {run.reused} ({workers} workers)")
            run.render(compute.engine(workers), context.log.info)
            done = run.finish()
        # Each partition's materialization carries its own numbers; what is run-wide says so.
        for b in done.buckets:
            context.add_asset_metadata(
                {"samples": b.samples, "rendered": b.rendered, "reused": b.reused,
                 "statuses": md_counts(list(b.statuses)),
                 "status": f"{b.samples:,} samples" if b.samples else "empty: no sample is assigned to this bucket"},
                partition_key=b.bucket_id,
            )
        return dg.MaterializeResult(
            metadata={
                "run_samples": done.samples,
                "run_rendered": done.rendered,
                "run_reused": done.reused,
                "run_buckets_rendered": done.buckets_rendered,
                "run_statuses": md_counts(list(done.statuses)),
            }
        )

    return processed_images
