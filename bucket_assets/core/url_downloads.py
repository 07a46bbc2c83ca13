"""The url_downloads table's lifecycle in a build: list each `urls` source's URLs, decide in
DuckDB which have a result that stands, fetch the rest (core/download.py, on this machine's
threads or the Celery workers), commit one row per URL.

Nothing the size of the URL list is held in Python: per source, the run's staging dir holds

    requests-<i>.parquet  every (image_id, url) with an id, numbered (`ord`) in file then row order
    ids-<i>.parquet       each id's first row
    journal-<i>.parquet   the rows a killed run journaled, numbered in journal order
    found-<i>.parquet     each id's first row with the result found for its URL: the latest
                          journaled one, else the table's row (only what decides: it stays)
    missing-<i>.parquet   the `ord`s whose stored bytes are gone or cut short (stat'ed in batches)
    decided-<i>.parquet   found + to_fetch: whether it is fetched (no result, a retryable reason, bytes gone)
    todo-<i>.parquet      what is fetched, in list order
    results-<i>.parquet   what fetching gave (also journaled as it arrives, so a kill loses none)

and the coordinator holds a batch of rows at a time. The commit leaves a committed row the run
reuses as it is in place and writes only the others; a no-op build writes nothing.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.atomic import locked_run_dir
from bucket_assets.core.db import DUCK_TYPES, Connect, streaming, table_exists, transaction
from bucket_assets.core.download import RETRYABLE, DownloadSettings, blob_path, download_all, journal_path
from bucket_assets.core.journal import read_batches, rows_table
from bucket_assets.core.progress import Progress
from bucket_assets.core.sources import urls
from bucket_assets.spec import UrlSource

TABLE = "url_downloads"
SCHEMA = pa.schema(
    [
        ("source", pa.string()), ("image_id", pa.string()), ("url", pa.string()), ("status", pa.string()),
        ("detail", pa.string()), ("http_status", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
        ("content_type", pa.string()), ("attempts", pa.int32()), ("final_url", pa.string()),
    ]
)
# A fetch result (core/download.py's FetchResult, a journal row): a row without its source.
RESULT_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "source"])
_RESULTS_SCHEMA = pa.schema([("ord", pa.int64()), *RESULT_SCHEMA])
_COLS = [f.name for f in RESULT_SCHEMA]
_DECIDING = ("status", "sha256", "bytes")  # what decides whether a previous result stands
BATCH_ROWS = 4096
STAGING_PREFIX = "url-downloads-"

# download.is_retryable in SQL: a rerun fetches these again.
_RETRYABLE_SQL = "(list_contains($retryable, {s}) OR (starts_with({s}, 'http_5') AND length({s}) = 8))"

class Engine(Protocol):
    """A compute engine (bucket_assets.distributed): `map("fetch", items)` gives each item's
    result row, in order."""

    def map(self, name: str, items: Iterable) -> Iterator: ...


def settings_for(source: UrlSource) -> DownloadSettings:
    return DownloadSettings(**source.download.model_dump())


@dataclass(frozen=True)
class SourcePlan:
    name: str
    urls: int  # ids in the list (a repeated id counts once: its first row)
    fetch: int  # of those, fetched by this run


@dataclass(frozen=True)
class DownloadsSummary:
    rows: int
    fetched: int
    bytes_stored: int
    statuses: tuple[tuple[str, int], ...]  # (status, rows), most first

    @property
    def reused(self) -> int:
        return self.rows - self.fetched


@contextmanager
def download_run(sources: list[UrlSource], store: str | os.PathLike, staging_root: str | os.PathLike,
                 connect: Connect, batch_rows: int = BATCH_ROWS) -> Iterator["DownloadRun"]:
    """A run over these sources, planned on entry: fetch() then commit(). Leaving it without
    commit() commits nothing (a rerun resumes from the journals); its staging files go."""
    run = DownloadRun(sources, store, staging_root, connect, batch_rows)
    try:
        run.plan()
        yield run
    finally:
        run.close()


class DownloadRun:
    def __init__(self, sources: list[UrlSource], store: str | os.PathLike, staging_root: str | os.PathLike,
                 connect: Connect, batch_rows: int = BATCH_ROWS):
        self.sources, self.store, self.connect, self.batch_rows = list(sources), Path(store), connect, batch_rows
        self.dir, self._lock = locked_run_dir(staging_root, STAGING_PREFIX)
        self.planned: list[SourcePlan] = []
        self.fetched = 0

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock)

    def _file(self, kind: str, i: int) -> Path:
        return self.dir / f"{kind}-{i}.parquet"

    # -- plan ------------------------------------------------------------------------------
    def plan(self) -> None:
        for i, src in enumerate(self.sources):
            self._list(i, src)
            self._load_journal(i, src)
            with self.connect() as con, streaming(con):
                self._find(con, i, src)
            self._stat_stored(i)
            with self.connect() as con, streaming(con):
                self._decide(con, i)
                urls_n, fetch_n = con.execute("SELECT count(*), count(*) FILTER (WHERE to_fetch) FROM read_parquet($d)",
                                              {"d": str(self._file("decided", i))}).fetchone()
            self.planned.append(SourcePlan(src.name, urls_n, fetch_n))

    def _list(self, i: int, src: UrlSource) -> None:
        schema = pa.schema([("ord", pa.int64()), ("image_id", pa.string()), ("url", pa.string())])
        n = 0
        with pq.ParquetWriter(self._file("requests", i), schema) as w:
            for batch in urls.request_batches(src, self.batch_rows * 16):
                ords = pa.array(range(n, n + batch.num_rows), pa.int64())
                w.write_batch(pa.RecordBatch.from_arrays([ords, batch.column(0), batch.column(1)], schema=schema))
                n += batch.num_rows

    def _load_journal(self, i: int, src: UrlSource) -> None:
        schema = pa.schema([("seq", pa.int64()), *RESULT_SCHEMA])
        n = 0
        with pq.ParquetWriter(self._file("journal", i), schema) as w:
            for rows in read_batches(journal_path(self.store, src.name), self.batch_rows):
                t = rows_table(rows, RESULT_SCHEMA)  # a row that does not fit is fetched again
                w.write_table(pa.table([pa.array(range(n, n + t.num_rows), pa.int64()), *t.columns], schema=schema))
                n += t.num_rows

    def _find(self, con, i: int, src: UrlSource) -> None:
        res = [c for c in _COLS if c not in ("image_id", "url")]
        have = table_exists(con, TABLE)
        # Of the table's row only what decides is read: a reused committed row stays in place,
        # so only a journaled row is ever written from these columns.
        table = (f'SELECT image_id, url, status, sha256, bytes FROM "{TABLE}" WHERE source = $source' if have else
                 "SELECT NULL::VARCHAR AS image_id, NULL::VARCHAR AS url, NULL::VARCHAR AS status, "
                 "NULL::VARCHAR AS sha256, NULL::BIGINT AS bytes")
        pick = ", ".join(f'CASE WHEN j.image_id IS NOT NULL THEN j."{c}" ELSE t."{c}" END AS "prev_{c}"'
                         if c in _DECIDING else f'j."{c}" AS "prev_{c}"' for c in res)
        # An id's first row is the one fetched (a later row with it is a duplicate_id in raw_index).
        # Its own statement: with the joins below in one, a 1M-URL no-op ran out of the 256MB cap.
        # The aggregate holds numbers only: arg_min(url, ord) ran out of that cap at 10M URLs.
        con.execute("COPY (SELECT r.ord, r.image_id, r.url FROM read_parquet($requests) r SEMI JOIN "
                    "(SELECT min(ord) AS ord FROM read_parquet($requests) GROUP BY image_id) f ON f.ord = r.ord) "
                    "TO $out (FORMAT parquet)",
                    {"requests": str(self._file("requests", i)), "out": str(self._file("ids", i))})
        # A journaled result (the latest for the URL) stands before the table's row.
        con.execute(
            f"""COPY (
                WITH j AS (SELECT * FROM read_parquet($journal)
                           QUALIFY row_number() OVER (PARTITION BY image_id, url ORDER BY seq DESC) = 1)
                SELECT r.ord, r.image_id, r.url,
                       CASE WHEN j.image_id IS NOT NULL THEN 0 WHEN t.image_id IS NOT NULL THEN 1 END AS origin, {pick}
                FROM read_parquet($ids) r
                LEFT JOIN j ON j.image_id = r.image_id AND j.url = r.url
                LEFT JOIN ({table}) t ON t.image_id = r.image_id AND t.url = r.url
            ) TO $out (FORMAT parquet)""",
            {"ids": str(self._file("ids", i)), "journal": str(self._file("journal", i)),
             "out": str(self._file("found", i)), **({"source": src.name} if have else {})})

    def _stat_stored(self, i: int) -> None:
        """The rows whose result is stored bytes that are gone or not their length: fetched
        again. One stat per stored result, in batches, outside any DB connection."""
        schema = pa.schema([("ord", pa.int64())])
        with pq.ParquetWriter(self._file("missing", i), schema) as w, \
                pq.ParquetFile(self._file("found", i), pre_buffer=False) as f:
            for b in f.iter_batches(batch_size=self.batch_rows, columns=["ord", "prev_status", "prev_sha256", "prev_bytes"]):
                gone = [o for o, st, sha, size in zip(*(b.column(k).to_pylist() for k in range(4)))
                        if st == "ok" and not _stored(self.store, sha, size)]
                if gone:
                    w.write_table(pa.table({"ord": pa.array(gone, pa.int64())}))

    def _decide(self, con, i: int) -> None:
        fetch = f"(f.prev_status IS NULL OR m.ord IS NOT NULL OR {_RETRYABLE_SQL.format(s='f.prev_status')})"
        con.execute(
            f"""COPY (SELECT f.*, {fetch} AS to_fetch, coalesce(f.origin = 1 AND NOT {fetch}, false) AS as_committed
                      FROM read_parquet($found) f LEFT JOIN read_parquet($missing) m ON m.ord = f.ord)
                TO $out (FORMAT parquet)""",
            {"found": str(self._file("found", i)), "missing": str(self._file("missing", i)),
             "retryable": sorted(RETRYABLE), "out": str(self._file("decided", i))})
        con.execute("COPY (SELECT ord, image_id, url FROM read_parquet($d) WHERE to_fetch ORDER BY ord) "
                    f"TO $out (FORMAT parquet, ROW_GROUP_SIZE {self.batch_rows})",
                    {"d": str(self._file("decided", i)), "out": str(self._file("todo", i))})

    # -- fetch -----------------------------------------------------------------------------
    def fetch(self, log: Callable[[str], None] | None = None, engine: Engine | None = None) -> None:
        """Fetch every source's todo in list order, a batch at a time: each result is journaled
        as it arrives and the batch's rows go to the results file. `engine`: fetch on it (the
        Celery workers); None fetches on this process's threads."""
        for i, (src, plan) in enumerate(zip(self.sources, self.planned)):
            with pq.ParquetWriter(self._file("results", i), _RESULTS_SCHEMA) as w:
                if not plan.fetch:
                    continue
                progress = Progress(f"url_downloads: {src.name} URLs fetched", plan.fetch, log)
                settings = settings_for(src)
                remote = partial(_fetch_on, engine, str(self.store), settings) if engine is not None else None
                with pq.ParquetFile(self._file("todo", i), pre_buffer=False) as f:
                    for b in f.iter_batches(batch_size=self.batch_rows):
                        items = list(zip(b.column("image_id").to_pylist(), b.column("url").to_pylist()))
                        rows = download_all(items, self.store, settings, None, journal_path(self.store, src.name),
                                            on_fetched=lambda _row: progress.advance(), fetch_many=remote,
                                            todo=list(range(len(items))))
                        t = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
                        w.write_table(pa.table([b.column("ord"), *t.columns], schema=_RESULTS_SCHEMA))
                        self.fetched += len(rows)
                progress.close()

    # -- commit ----------------------------------------------------------------------------
    def commit(self) -> DownloadsSummary:
        """In one transaction: drop the rows of sources the spec no longer has, and per source
        delete the committed rows the run does not keep as they are and insert the rest (a
        source with nothing fetched whose rows all stand writes nothing). Then the journals go."""
        cols = ", ".join(f'"{c}"' for c in _COLS)
        prev = ", ".join(f'"prev_{c}" AS "{c}"' if c not in ("image_id", "url") else f'"{c}"' for c in _COLS)
        with self.connect() as con:
            # Under the stream cap: the delete's anti-join and the insert only pass rows through
            # (at 1M URLs under the full cap the commit took the coordinator to 515 MB).
            with streaming(con), transaction(con, TABLE):
                columns = ", ".join(f'"{f.name}" {DUCK_TYPES[f.type]}' for f in SCHEMA)
                con.execute(f'CREATE TABLE IF NOT EXISTS "{TABLE}" ({columns})')
                names = {"names": [s.name for s in self.sources]}
                if con.execute(f'SELECT count(*) FROM "{TABLE}" WHERE NOT list_contains($names, source)',
                               names).fetchone()[0]:
                    con.execute(f'DELETE FROM "{TABLE}" WHERE NOT list_contains($names, source)', names)
                for i, (src, plan) in enumerate(zip(self.sources, self.planned)):
                    p = {"source": src.name, "decided": str(self._file("decided", i))}
                    committed = con.execute(f'SELECT count(*) FROM "{TABLE}" WHERE source = $source',
                                            {"source": src.name}).fetchone()[0]
                    kept = con.execute("SELECT count(*) FILTER (WHERE as_committed) FROM read_parquet($decided)",
                                       {"decided": p["decided"]}).fetchone()[0]
                    if kept == committed == plan.urls:
                        continue  # every committed row stands as it is, and there is no other
                    con.execute(
                        f"""DELETE FROM "{TABLE}" t WHERE source = $source AND NOT EXISTS (
                                SELECT 1 FROM read_parquet($decided) d
                                WHERE d.as_committed AND d.image_id = t.image_id AND d.url = t.url)""", p)
                    con.execute(
                        f"""INSERT INTO "{TABLE}" BY NAME
                            SELECT $source AS source, {cols} FROM read_parquet($results)
                            UNION ALL
                            SELECT $source AS source, {prev} FROM read_parquet($decided) WHERE NOT to_fetch AND NOT as_committed""",
                        {**p, "results": str(self._file("results", i))})
                    n = con.execute(f'SELECT count(*) FROM "{TABLE}" WHERE source = $source',
                                    {"source": src.name}).fetchone()[0]
                    if n != plan.urls:  # rolled back
                        raise RuntimeError(f"{TABLE}: source {src.name}: the commit left {n} rows for {plan.urls} URLs")
            for src in self.sources:
                journal_path(self.store, src.name).unlink(missing_ok=True)
            rows, stored = con.execute(f"""SELECT count(*), coalesce(sum(bytes) FILTER (WHERE status = 'ok'), 0)
                                           FROM "{TABLE}" """).fetchone()
            statuses = con.execute(f'SELECT status, count(*) AS n FROM "{TABLE}" GROUP BY status '
                                   "ORDER BY n DESC, status").fetchall()
        return DownloadsSummary(rows, self.fetched, int(stored), tuple((s, n) for s, n in statuses))


def _fetch_on(engine: Engine, store: str, settings: DownloadSettings, todo: list[tuple[str, str]]) -> Iterable[dict]:
    return engine.map("fetch", [(iid, url, store, settings) for iid, url in todo])


def _stored(store: Path, sha256: str | None, size: int | None) -> bool:
    if not sha256:
        return False
    try:
        return blob_path(store, sha256).stat().st_size == size
    except (OSError, ValueError):
        return False
