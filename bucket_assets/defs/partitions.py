"""Bucket partitions: one per bucket id of the spec's bucket table (40 per base resolution)."""


import dagster as dg

from bucket_assets.core.buckets import bucket_table
from bucket_assets.spec import Spec


def bucket_partitions(spec: Spec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(
        [b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)]
    )
