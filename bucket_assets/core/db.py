"""The metadata database: one DuckDB file in work_dir, opened under an exclusive file lock.

DuckDB allows one writing process per file (and a reader cannot open it while another process
writes). Every connection here takes an fcntl lock on `<db>.lock` first, so concurrent
partition runs queue for a moment instead of failing. Hold connections briefly: pixel work
happens outside them.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import duckdb
import pyarrow as pa

from bucket_assets.core.failpoints import failpoint


# A locked connection to the metadata DB, held only while SQL runs (DatasetResource.db).
Connect = Callable[[], ContextManager[duckdb.DuckDBPyConnection]]

# The DuckDB column type of each Arrow type a table of ours uses.
DUCK_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.int8(): "TINYINT"}

# Connection id -> (stream cap, memory_limit) for streaming(); set by connect().
_caps: dict[int, tuple[str, str]] = {}


@contextmanager
def connect(db_path: str | os.PathLike, memory_limit: str = "3GB",
            stream_memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A locked connection. DuckDB's working memory is capped (`memory_limit`); larger joins and
    sorts spill to `<db dir>/tmp/duckdb` instead of growing the process. Statements run inside
    `streaming(con)` get the lower `stream_memory_limit`."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    spill = db_path.parent / "tmp" / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    with open(f"{db_path}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            con = duckdb.connect(
                str(db_path), config={"memory_limit": memory_limit, "temp_directory": str(spill)}
            )
            if stream_memory_limit is not None:
                _caps[id(con)] = (stream_memory_limit, memory_limit)
            try:
                yield con
            finally:
                _caps.pop(id(con), None)
                con.close()
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@contextmanager
def streaming(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Run statements that only pass rows through (scan, join, sort, write out) under the
    connection's stream cap: DuckDB keeps what it reads and sorts in its buffer pool up to its
    cap, so under the full cap such a statement's memory grows with the rows until the cap
    (measured: 1M shard plan rows, 2.1 GB at 3GB, 0.6 GB at 256MB, 1.8x the time). A
    connection without one (not from connect()) keeps its cap. The sizes are validated spec
    strings (SET takes no bound parameters)."""
    caps = _caps.get(id(con))
    if caps is None:
        yield con
        return
    low, high = caps
    con.execute(f"SET memory_limit = '{low}'")
    try:
        yield con
    except BaseException:
        try:
            con.execute(f"SET memory_limit = '{high}'")
        except duckdb.Error:
            pass  # an aborted transaction: its rollback comes first; the lower cap only slows
        raise
    con.execute(f"SET memory_limit = '{high}'")


_in_transaction: set[int] = set()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, name: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """All writes inside commit together or not at all (a killed run leaves the previous
    tables). Nested use joins the outer transaction."""
    if id(con) in _in_transaction:
        yield con
        failpoint("db_commit", name)
        return
    con.execute("BEGIN TRANSACTION")
    _in_transaction.add(id(con))
    try:
        yield con
        failpoint("db_commit", name)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        _in_transaction.discard(id(con))


def replace_table(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    """CREATE OR REPLACE `name` from an Arrow table. `name` is a constant of our code, never input."""
    with transaction(con, name):
        con.register("_incoming", table)
        con.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT * FROM _incoming')
        con.unregister("_incoming")


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0]
    )


def replace_partitions(
    con: duckdb.DuckDBPyConnection, name: str, table: pa.Table, bucket_ids: list[str]
) -> None:
    """Replace the rows of `bucket_ids` in a bucket-partitioned table, in one transaction."""
    with transaction(con, name):
        con.register("_incoming", table)
        if not table_exists(con, name):
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _incoming LIMIT 0')
        # A work dir from an older version may lack columns added since: add them (NULL for
        # the other partitions' rows, which their next run fills) instead of failing.
        have = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        for col, typ in con.execute("SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM _incoming)").fetchall():
            if col not in have:
                con.execute(f'ALTER TABLE "{name}" ADD COLUMN "{col}" {typ}')
        con.execute(f'DELETE FROM "{name}" WHERE list_contains(?, bucket_id)', [bucket_ids])
        con.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM _incoming')
        con.unregister("_incoming")


def drop_other_partitions(con: duckdb.DuckDBPyConnection, names: list[str], bucket_ids: list[str]) -> int:
    """Delete, in one transaction, the rows of buckets the spec no longer has (its base
    resolutions or divisible changed): their partitions will never run again, so their rows
    would otherwise be counted and published forever. Returns the rows deleted."""
    n = 0
    with transaction(con, "drop_other_partitions"):
        for name in names:
            if table_exists(con, name):
                n += con.execute(
                    f'DELETE FROM "{name}" WHERE NOT list_contains($ids, bucket_id)', {"ids": list(bucket_ids)}
                ).fetchone()[0]
    return n


# Derived tables. A table that is a pure function of other tables and settings records the
# version it was built from (table_versions: name -> version); a build whose inputs have the
# versions they had and whose settings are the same keeps it as it is, so a no-op build rewrites
# no table the size of the dataset. raw_index's version is the digest of the scan parts it was
# written from (core/scan_cache.py); every other version digests its inputs' versions, its
# settings and the SQL that builds it. A table without a version (a work dir from before, a
# table written by hand) is always rebuilt, and so is everything derived from it.
VERSIONS_TABLE = "table_versions"


def table_version(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    if not (table_exists(con, VERSIONS_TABLE) and table_exists(con, name)):
        return None
    row = con.execute(f'SELECT max(version), count(*) FROM "{VERSIONS_TABLE}" WHERE name = ?', [name]).fetchone()
    return row[0] if row[1] == 1 else None


def set_table_version(con: duckdb.DuckDBPyConnection, name: str, version: str | None) -> None:
    """Record (or, with None, forget) the version `name` now holds; call it in the transaction
    that writes the table."""
    with transaction(con, VERSIONS_TABLE):
        con.execute(f'CREATE TABLE IF NOT EXISTS "{VERSIONS_TABLE}" (name VARCHAR, version VARCHAR)')
        con.execute(f'DELETE FROM "{VERSIONS_TABLE}" WHERE name = ?', [name])
        if version is not None:
            con.execute(f'INSERT INTO "{VERSIONS_TABLE}" VALUES (?, ?)', [name, version])


def derived_version(con: duckdb.DuckDBPyConnection, inputs: list[str], settings: object) -> str | None:
    """The version of a table built from the tables `inputs` with `settings` (JSON-able: include
    the SQL or a code version); None when an input has no version."""
    import hashlib
    import json

    versions = [table_version(con, t) for t in inputs]
    if any(v is None for v in versions):
        return None
    text = json.dumps({"inputs": dict(zip(inputs, versions)), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def rebuild_unless_current(con: duckdb.DuckDBPyConnection, name: str, inputs: list[str], settings: object,
                           build: Callable[[], None]) -> bool:
    """Build table `name` with `build()` (in one transaction, with its new version) unless it
    already holds the version its inputs and settings give. Returns whether it was built."""
    version = derived_version(con, inputs, settings)
    if version is not None and table_version(con, name) == version:
        return False
    with transaction(con, name):
        build()
        set_table_version(con, name, version)
    return True
