"""Resources: the dataset spec and its metadata database."""


import os
from contextlib import contextmanager
from typing import Iterator, Optional

import dagster as dg
import duckdb

from bucket_assets.core.db import connect
from bucket_assets.spec import Spec, load_spec


class DatasetResource(dg.ConfigurableResource):
    """The spec file a run builds, and a locked connection to its DuckDB metadata database.
    `output_dir` / `work_dir`, when set, replace the spec's (shared storage for a distributed
    build; where files live is not part of the export's identity, so the manifest is the same)."""

    spec_path: str
    output_dir: Optional[str] = None
    work_dir: Optional[str] = None

    def load(self) -> Spec:
        spec = load_spec(self.spec_path)
        update = {k: os.path.abspath(v) for k, v in (("output_dir", self.output_dir), ("work_dir", self.work_dir)) if v}
        return spec.model_copy(update=update) if update else spec

    @contextmanager
    def db(self) -> Iterator[duckdb.DuckDBPyConnection]:
        spec = self.load()
        with connect(spec.db_path, spec.metadata.memory_limit, spec.metadata.stream_limit()) as con:
            yield con


class ComputeResource(dg.ConfigurableResource):
    """Where a step's heavy per-item work runs: this machine's process pool, or Celery workers
    on any number of machines when `celery_broker` is set (bucket_assets.distributed)."""

    celery_broker: Optional[str] = None
    chunk: int = 16  # items per Celery task

    def engine(self, workers: int):
        from bucket_assets.distributed import CeleryCompute, LocalCompute

        if self.celery_broker:
            return CeleryCompute(self.celery_broker, chunk=self.chunk)
        return LocalCompute(workers)
