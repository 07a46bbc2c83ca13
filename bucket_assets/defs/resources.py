"""Resources: the dataset spec and its metadata database."""


from contextlib import contextmanager
from typing import Iterator

import dagster as dg
import duckdb

from bucket_assets.core.db import connect
from bucket_assets.spec import Spec, load_spec


class DatasetResource(dg.ConfigurableResource):
    """The spec file a run builds, and a locked connection to its DuckDB metadata database."""

    spec_path: str

    def load(self) -> Spec:
        return load_spec(self.spec_path)

    @contextmanager
    def db(self) -> Iterator[duckdb.DuckDBPyConnection]:
        spec = self.load()
        with connect(spec.db_path, spec.metadata.memory_limit) as con:
            yield con
