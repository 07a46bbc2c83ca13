"""The url_downloads lifecycle (core/url_downloads.py) against a real HTTP server on 127.0.0.1:
what a rerun fetches again is decided in DuckDB, results come back in batches, and the commit
writes only the rows that changed."""

from __future__ import annotations

from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bucket_assets.core import url_downloads as ud
from bucket_assets.core.db import connect
from bucket_assets.core.download import blob_path, journal_path
from bucket_assets.spec import UrlSource
from bucket_assets_tests.conftest import CountingConnection
from bucket_assets_tests.core.test_download import FaultServer


class Fixture:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.work = tmp_path / "work"
        self.store = self.work / "downloads"
        self.db = self.work / "metadata.duckdb"
        self.log: list[tuple[str, int]] = []

    @contextmanager
    def connect(self):
        with connect(self.db, "1GB", "256MB") as con:
            yield CountingConnection(con, self.log, "url_downloads")

    def source(self, name: str, *tables: pa.Table, **download) -> UrlSource:
        d = self.tmp / f"meta-{name}"
        d.mkdir(exist_ok=True)
        for old in d.glob("*.parquet"):
            old.unlink()
        for k, t in enumerate(tables):
            pq.write_table(t, d / f"part-{k}.parquet", row_group_size=3)
        return UrlSource(name=name, kind="urls", path=str(d / "*.parquet"), columns={"id": "key", "url": "url"},
                         download={"concurrency": 4, "retries": 0, "timeout_s": 5, "backoff_s": 0.01, **download})

    def build(self, *sources: UrlSource, batch_rows: int = 2, engine=None):
        self.log.clear()
        with ud.download_run(list(sources), self.store, self.work / "tmp", self.connect, batch_rows) as run:
            planned = {p.name: (p.urls, p.fetch) for p in run.planned}
            run.fetch(engine=engine)
            done = run.commit()
        return planned, done

    def rows(self) -> dict[tuple[str, str], dict]:
        with connect(self.db) as con:
            t = con.execute('SELECT * FROM "url_downloads" ORDER BY source, image_id').to_arrow_table()
        return {(r["source"], r["image_id"]): r for r in t.to_pylist()}


def _urls(keys, urls) -> pa.Table:
    return pa.table({"key": keys, "url": urls, "caption": [f"caption {i}" for i in range(len(urls))]})


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


def test_a_url_list_becomes_one_row_per_id_and_a_rerun_fetches_and_writes_nothing(server, tmp_path, monkeypatch):
    f = Fixture(tmp_path)
    b = server.base
    src = f.source("web",
                   _urls(["a", "b", None, "a", "c"], [b + "/img/1", b + "/404", b + "/img/9", b + "/img/2", None]),
                   _urls(["d", "e", "f", "g"], [b + "/img/3", b + "/html", b + "/same/1", b + "/same/2"]))
    batches = []
    real = ud.download_all
    monkeypatch.setattr(ud, "download_all", lambda items, *a, **k: batches.append(len(items)) or real(items, *a, **k))
    planned, done = f.build(src)
    # The first row of an id is the one fetched; a row without an id is not a URL of the list.
    assert planned == {"web": (7, 7)}
    assert batches and max(batches) <= 2 and sum(batches) == 7
    rows = f.rows()
    assert {k[1]: r["status"] for k, r in rows.items()} == {
        "a": "ok", "b": "http_404", "c": "invalid_url", "d": "ok", "e": "not_an_image", "f": "ok", "g": "ok"}
    assert rows[("web", "a")]["url"] == b + "/img/1" and rows[("web", "c")]["url"] == ""
    assert rows[("web", "f")]["sha256"] == rows[("web", "g")]["sha256"]  # one stored file for both
    assert blob_path(f.store, rows[("web", "a")]["sha256"]).is_file()
    assert done.rows == 7 and done.fetched == 7 and done.reused == 0
    assert dict(done.statuses) == {"ok": 4, "http_404": 1, "invalid_url": 1, "not_an_image": 1}
    assert "/img/9" not in server.hits and "/img/2" not in server.hits

    hits = dict(server.hits)
    batches.clear()
    planned, done = f.build(src)
    assert planned == {"web": (7, 0)} and batches == [] and server.hits == hits
    assert done.fetched == 0 and done.reused == 7
    assert f.log == []  # the table already holds every row as it stands: nothing written
    assert f.rows() == rows


def test_retryable_failures_and_missing_bytes_are_fetched_again_and_only_their_rows_rewritten(server, tmp_path):
    f = Fixture(tmp_path)
    b = server.base
    src = f.source("web", _urls(["ok", "gone", "flaky", "final", "int"],
                                [b + "/img/1", b + "/img/2", b + "/flaky/3", b + "/404", b + "/img/4"]))
    f.build(src)
    first = f.rows()
    assert first[("web", "flaky")]["status"] == "http_500" and first[("web", "final")]["status"] == "http_404"
    blob_path(f.store, first[("web", "gone")]["sha256"]).unlink()
    # A stored file cut short counts as gone too.
    cut = blob_path(f.store, first[("web", "int")]["sha256"])
    cut.write_bytes(cut.read_bytes()[:10])
    planned, done = f.build(src)
    assert planned == {"web": (5, 3)}
    assert server.hits["/404"] == 1 and server.hits["/img/1"] == 1 and server.hits["/flaky/3"] == 2
    after = f.rows()
    assert after[("web", "flaky")]["status"] == "ok" and blob_path(f.store, after[("web", "gone")]["sha256"]).is_file()
    assert cut.stat().st_size == after[("web", "int")]["bytes"]
    assert f.log == [("DELETE", 3), ("INSERT", 3)]  # only the 3 rows fetched again are replaced
    assert after[("web", "ok")] == first[("web", "ok")] and after[("web", "final")] == first[("web", "final")]

    # A URL that changed under the same id is fetched; its old row goes.
    src = f.source("web", _urls(["ok", "gone", "flaky", "final", "int"],
                                [b + "/img/1", b + "/img/2", b + "/flaky/3", b + "/img/5", b + "/img/4"]))
    planned, _ = f.build(src)
    assert planned == {"web": (5, 1)} and f.rows()[("web", "final")]["status"] == "ok"
    assert f.log == [("DELETE", 1), ("INSERT", 1)]


def test_integer_ids_a_killed_runs_journal_and_a_removed_source(server, tmp_path):
    f = Fixture(tmp_path)
    b = server.base
    nums = f.source("nums", pa.table({"key": pa.array([7, 8, 9], pa.int64()), "url": [b + "/img/7", b + "/img/8", b + "/img/9"],
                                    "caption": ["a", "b", "c"]}))
    words = f.source("words", _urls(["x"], [b + "/img/10"]))
    # What a killed run journaled (the last line torn by the kill) is not fetched again.
    j = journal_path(f.store, "nums")
    j.parent.mkdir(parents=True)
    ud.download_all([("7", b + "/img/7")], f.store, ud.settings_for(nums), journal=j)
    with open(j, "a") as fh:
        fh.write('{"image_id": "8", "url": "')
    assert server.hits["/img/7"] == 1
    planned, _ = f.build(nums, words)
    assert planned == {"nums": (3, 2), "words": (1, 1)}
    assert server.hits["/img/7"] == 1 and not j.exists()
    assert sorted(k for k in f.rows()) == [("nums", "7"), ("nums", "8"), ("nums", "9"), ("words", "x")]
    # A source the spec no longer has loses its rows; the other's stand as they are.
    planned, done = f.build(nums)
    assert planned == {"nums": (3, 0)} and done.rows == 3
    assert f.log == [("DELETE", 1)]
    assert sorted(k for k in f.rows()) == [("nums", "7"), ("nums", "8"), ("nums", "9")]


def test_a_run_left_without_commit_keeps_its_journal_and_leaves_the_table(server, tmp_path):
    f = Fixture(tmp_path)
    b = server.base
    src = f.source("web", _urls(["a", "b"], [b + "/img/1", b + "/img/2"]))
    with ud.download_run([src], f.store, f.work / "tmp", f.connect, 1) as run:
        run.fetch()
        staging = run.dir
    assert not staging.exists()
    assert journal_path(f.store, "web").is_file()
    with connect(f.db) as con:
        from bucket_assets.core.db import table_exists

        assert not table_exists(con, "url_downloads")
    planned, _ = f.build(src)
    assert planned == {"web": (2, 0)} and server.hits["/img/1"] == 1
    assert {k[1]: r["status"] for k, r in f.rows().items()} == {"a": "ok", "b": "ok"}


def test_an_unreadable_metadata_file_is_a_named_error(tmp_path):
    f = Fixture(tmp_path)
    src = f.source("web", _urls(["a"], ["http://127.0.0.1:9/x.jpg"]))
    bad = next((tmp_path / "meta-web").glob("*.parquet"))
    bad.write_bytes(b"PAR1 not really")
    from bucket_assets.core.sources.parquet import SourceError

    with pytest.raises(SourceError, match=r"source web: cannot read parquet .*part-0\.parquet"):
        f.build(src)
