"""Metadata DB helpers."""

import duckdb
import pyarrow as pa

from bucket_assets.core.db import replace_partitions


def test_replace_partitions_adds_columns_a_newer_version_writes():
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT 'a' AS bucket_id, 'x' AS key UNION ALL SELECT 'b', 'y'")
    new = pa.table({"bucket_id": ["b", "b"], "key": ["y", "z"], "pack_offset": pa.array([0, 7], pa.int64())})
    replace_partitions(con, "t", new, ["b"])
    assert con.execute("SELECT bucket_id, key, pack_offset FROM t ORDER BY key").fetchall() == [
        ("a", "x", None), ("b", "y", 0), ("b", "z", 7)
    ]
    # Columns in another order insert by name.
    replace_partitions(con, "t", new.select(["pack_offset", "key", "bucket_id"]), ["b"])
    assert con.execute("SELECT count(*), sum(pack_offset) FROM t WHERE bucket_id = 'b'").fetchone() == (2, 7)
