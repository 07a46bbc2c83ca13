"""Metadata DB helpers."""

import pytest
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


def test_a_derived_table_is_kept_while_its_inputs_and_settings_are_the_same():
    from bucket_assets.core.db import rebuild_unless_current, set_table_version, table_version

    con = duckdb.connect()
    con.execute("CREATE TABLE src AS SELECT 1 AS x")
    builds = []

    def build():
        builds.append(1)
        con.execute("CREATE OR REPLACE TABLE out AS SELECT x * 2 AS y FROM src")

    def run(settings=None):
        return rebuild_unless_current(con, "out", ["src"], settings or {"k": 1}, build)

    # An input without a version: built every time, and no version recorded.
    assert run() and run() and table_version(con, "out") is None
    set_table_version(con, "src", "v1")
    assert run() and table_version(con, "out") is not None
    assert not run() and len(builds) == 3  # same input version, same settings: kept
    assert run({"k": 2}) and not run({"k": 2})  # other settings
    set_table_version(con, "src", "v2")
    assert run({"k": 2}) and len(builds) == 5  # a new input version
    con.execute("DROP TABLE out")
    assert table_version(con, "out") is None and run({"k": 2})  # a table that is gone is built
    set_table_version(con, "src", None)
    assert run({"k": 2}) and table_version(con, "out") is None  # forgotten: derived ones forget too
    # A failed build leaves the table and its version as they were.
    set_table_version(con, "src", "v3")
    assert run()
    before = table_version(con, "out")
    set_table_version(con, "src", "v4")

    def broken():
        con.execute("CREATE OR REPLACE TABLE out AS SELECT 'partial' AS y")
        raise RuntimeError("killed")

    try:
        rebuild_unless_current(con, "out", ["src"], {"k": 1}, broken)
    except RuntimeError:
        pass
    assert table_version(con, "out") == before and con.execute("SELECT y FROM out").fetchall() == [(2,)]



def test_streaming_statements_run_under_the_stream_cap_and_restore_the_full_cap(tmp_path):
    from bucket_assets.core.db import connect, streaming

    def cap(con) -> str:
        return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]

    with connect(tmp_path / "m.duckdb", "2GB", "128MB") as con:
        full = cap(con)
        with streaming(con):
            low = cap(con)
            # A sort of more than the cap spills instead of failing.
            n = con.execute("SELECT count(*) FROM (SELECT i, repeat('x', 200) || i AS s FROM range(2000000) t(i) "
                            "ORDER BY s DESC)").fetchone()[0]
        assert n == 2_000_000
        assert cap(con) == full
        with pytest.raises(duckdb.Error):
            with streaming(con):
                con.execute("SELECT * FROM no_such_table")
        assert cap(con) == full  # restored after a failed statement too
    assert (low, full) == ("122.0 MiB", "1.8 GiB")
    with connect(tmp_path / "n.duckdb", "2GB") as con:  # no stream cap: the full cap throughout
        full = cap(con)
        with streaming(con):
            assert cap(con) == full


def test_the_stream_cap_is_never_above_memory_limit():
    from bucket_assets.spec import Metadata

    assert Metadata().stream_limit() == "256MB"
    assert Metadata(memory_limit="100MB").stream_limit() == "100MB"
    assert Metadata(memory_limit="1GiB", stream_memory_limit="2GB").stream_limit() == "1GiB"
