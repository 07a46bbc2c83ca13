"""The Definitions object. The spec comes from $BUCKET_ASSETS_SPEC (default data/spec.yaml); its
bucket table decides the partitions, so it is read when this module is loaded."""

from __future__ import annotations

import os
import warnings

import dagster as dg

# BackfillPolicy.single_run is marked beta; we rely on it knowingly and keep the CLI's stderr to
# the one line that matters.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

from bucket_assets.defs.assets.assignment import bucket_assignments
from bucket_assets.defs.assets.captions import caption_table, selected_captions
from bucket_assets.defs.assets.downloads import url_downloads
from bucket_assets.defs.assets.export import bucket_shards_asset, dataset_card_asset, export_manifest_asset
from bucket_assets.defs.assets.images import processed_images_asset
from bucket_assets.defs.assets.ingest import filtered_images, raw_index
from bucket_assets.defs.checks import build_checks
from bucket_assets.defs.partitions import bucket_partitions
from bucket_assets.defs.resources import ComputeResource, DatasetResource
from bucket_assets.distributed import BROKER_ENV, CHUNK_ENV
from bucket_assets.defs.sensors import caption_change_sensor, caption_landing_sensor
from bucket_assets.spec import load_spec, resolve_spec_path

BUILD_JOB = "build_export"
# Shared storage for a distributed build, without touching the spec.
OUTPUT_DIR_ENV = "BUCKET_ASSETS_OUTPUT_DIR"
WORK_DIR_ENV = "BUCKET_ASSETS_WORK_DIR"


def dataset_resource(spec_path: str) -> DatasetResource:
    """The spec, with its dirs replaced by $BUCKET_ASSETS_OUTPUT_DIR / $BUCKET_ASSETS_WORK_DIR if set."""
    return DatasetResource(
        spec_path=spec_path,
        output_dir=os.environ.get(OUTPUT_DIR_ENV) or None,
        work_dir=os.environ.get(WORK_DIR_ENV) or None,
    )


def build_definitions(spec_path: str | None = None) -> dg.Definitions:
    spec_path = resolve_spec_path(spec_path)
    spec = load_spec(spec_path)
    partitions = bucket_partitions(spec)
    processed_images = processed_images_asset(partitions)
    bucket_shards = bucket_shards_asset(partitions, processed_images)
    export_manifest = export_manifest_asset(bucket_shards)
    dataset_card = dataset_card_asset(export_manifest)
    assets = [
        url_downloads, raw_index, filtered_images, bucket_assignments, caption_table, selected_captions,
        processed_images, bucket_shards, export_manifest, dataset_card,
    ]
    build_job = dg.define_asset_job(
        BUILD_JOB,
        selection=dg.AssetSelection.all(),
        executor_def=dg.in_process_executor,
        description="Every asset, every bucket partition, in one run (bucket-assets build).",
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=build_checks(filtered_images, export_manifest),
        jobs=[build_job],
        sensors=[caption_landing_sensor, caption_change_sensor],
        resources={
            "dataset": dataset_resource(spec_path),
            "compute": ComputeResource(
                celery_broker=os.environ.get(BROKER_ENV) or None, chunk=int(os.environ.get(CHUNK_ENV) or 16)
            ),
        },
    )


defs = build_definitions()


def build_job() -> dg.JobDefinition:
    """Module-level handle so `reconstructable` can rebuild the job in any process."""
    return defs.resolve_job_def(BUILD_JOB)
