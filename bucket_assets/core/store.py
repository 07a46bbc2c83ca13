"""The processed-image store's lifecycle for one run over some bucket partitions: plan, render,
compact, commit, prune (the pack format and render() itself are core/processing.py).

Nothing proportional to the dataset is held in Python. What to render, what to reuse and what
to delete is decided by joins in DuckDB; rows move between DuckDB and Python only in bounded
batches, through parquet files in a staging directory of the run (`<work_dir>/tmp/processed-*`),
which is also how the metadata DB's lock is free while pixels are rendered and records copied:

    plan     (DB lock)  the plan query of the requested buckets joined with the candidates for
                        reuse (rows a killed run journaled, loaded into a temp table in batches,
                        then the committed processed_images rows) and the packs on disk with
                        their sizes (a small temp table) -> todo.parquet (to render) and
                        kept.parquet (rows reused as they are), per-bucket counts
    render   (no lock)  todo.parquet in batches -> RenderTasks (a generator) -> engine.map ->
                        each result journaled -> results.parquet in batches
    compact             (lock) live bytes per bucket against its packs; the live rows of each
                        bucket to compact, in key order -> compact-src.parquet; (no lock) their
                        records copied into one new pack per bucket -> moved.parquet
    commit   (DB lock)  one transaction: the partitions' rows become kept + results (with the
                        moved locations): without moves, only the committed rows the plan does
                        not keep as they are go and only the other rows are inserted; then the
                        journals are removed; prune: files of these buckets that no committed
                        row references are deleted

Reuse: a planned sample keeps a candidate row when the row's fingerprint equals the one SQL
computes for the plan row and either its status is not `ok` (a failure is a result too) or its
record lies within a pack of its bucket listed on disk (pack_offset + bytes <= the pack's size,
so a pack that is gone or was cut short is rendered again). Of several candidates the newest
journaled row wins, then the committed one.

Fingerprints: SQL builds exactly the text RenderTask.fingerprint() hashes (the constant parts
come from processing.fingerprint_template), so the fingerprints stored by earlier versions stay
valid and RENDER_VERSION is unchanged. A source sha256 json.dumps would escape (never a hex
digest) gets no SQL fingerprint: such a sample is simply rendered again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.atomic import locked_run_dir, remove_stale_temps
from bucket_assets.core.db import DUCK_TYPES, VERSIONS_TABLE, Connect, derived_version, streaming, table_exists, transaction
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.journal import read_batches, rows_table
from bucket_assets.core.processing import (
    JOURNAL_NAME,
    PROCESSED_SCHEMA,
    Journal,
    RenderParams,
    RenderTask,
    close_store_packs,
    compact,
    fingerprint_template,
    is_pack,
    journal_path,
    needs_compaction,
    prune_gone_buckets,
    store_dir,
)
from bucket_assets.core.progress import Progress

TABLE = "processed_images"
# Rows per batch moved between DuckDB, the files of a run and Python (DuckDB's parquet row
# groups, which a reader holds one at a time, are this rounded up to a multiple of 2048).
BATCH_ROWS = 4096
STAGING_PREFIX = "processed-"

COLUMNS = [(f.name, DUCK_TYPES[f.type]) for f in PROCESSED_SCHEMA]
# A candidate's own columns: its identity and fingerprint, then what rendering produced.
_RESULT_COLUMNS = [c for c in COLUMNS if c[0] not in ("image_id", "bucket_id", "key", "fingerprint")]
_MOVED_SCHEMA = pa.schema([("bucket_id", pa.string()), ("key", pa.string()), ("path", pa.string()),
                           ("pack_offset", pa.int64())])

# A plan row's fingerprint, from its columns and the run's $fp_head/$fp_mid/$fp_tail (the text
# around the per-sample parts, fingerprint_params). json.dumps writes an int as its decimal digits
# and a string of printable ASCII other than '"' and '\' as it is ($json_plain).
FINGERPRINT_SQL = """sha256(
    $fp_head
    || concat_ws(', ', coalesce(resized_w::VARCHAR, 'null'), coalesce(resized_h::VARCHAR, 'null'),
                 coalesce(crop_left::VARCHAR, 'null'), coalesce(crop_top::VARCHAR, 'null'),
                 coalesce(target_w::VARCHAR, 'null'), coalesce(target_h::VARCHAR, 'null'))
    || $fp_mid
    || CASE WHEN source_sha256 IS NULL THEN 'null'
            WHEN regexp_full_match(source_sha256, $json_plain) THEN '"' || source_sha256 || '"' END
    || $fp_tail)"""

# The tables PLAN_SQL reads: with their versions (core.db) and the run's settings the same, a
# bucket whose committed rows and packs on disk are those recorded at its last commit is not
# planned at all (StoreRun._current_versions).
PLAN_INPUTS = ["raw_index", "filtered_images", "bucket_assignments"]
_VERSION_PREFIX = f"{TABLE}:"

# What RenderTask needs of each planned sample (named as its fields).
TASK_COLUMNS = ["image_id", "bucket_id", "key", "source_sha256", "location", "member", "data_offset", "byte_size",
                "scale", "resized_w", "resized_h", "crop_left", "crop_top", "target_w", "target_h", "orientation",
                "src_w", "src_h"]

PLAN_SQL = f"""
SELECT *, {FINGERPRINT_SQL} AS fingerprint FROM (
    SELECT a.image_id, a.bucket_id, a.key, r.sha256 AS source_sha256, r.location, r.member, r.data_offset,
           r.byte_size, a.scale, a.resized_w, a.resized_h, a.crop_left, a.crop_top, a.target_w, a.target_h,
           r.orientation, r.width AS src_w, r.height AS src_h
    FROM bucket_assignments a
    JOIN filtered_images f ON f.image_id = a.image_id AND f.decision = 'keep'
    JOIN raw_index r ON r.row_id = f.row_id
    WHERE a.status = 'ok' AND list_contains($buckets, a.bucket_id)
)"""


def fingerprint_params(params: RenderParams) -> dict:
    head, mid, tail = fingerprint_template(params)
    return {"fp_head": head, "fp_mid": mid, "fp_tail": tail, "json_plain": r"[ !#-\[\]-~]*"}


@dataclass(frozen=True)
class BucketSummary:
    bucket_id: str
    samples: int
    rendered: int
    statuses: tuple[tuple[str, int], ...]  # (status, samples), by status

    @property
    def reused(self) -> int:
        return self.samples - self.rendered


@dataclass(frozen=True)
class StoreSummary:
    buckets: tuple[BucketSummary, ...]  # every requested bucket, in request order
    statuses: tuple[tuple[str, int], ...]  # run-wide (status, samples), by status

    @property
    def samples(self) -> int:
        return sum(b.samples for b in self.buckets)

    @property
    def rendered(self) -> int:
        return sum(b.rendered for b in self.buckets)

    @property
    def reused(self) -> int:
        return self.samples - self.rendered

    @property
    def buckets_rendered(self) -> int:
        return sum(1 for b in self.buckets if b.rendered)


class ImageStore:
    """The store under `processed_dir` and its rows in the metadata DB (`connect()` gives a
    locked connection, held only while SQL runs). `staging_root` holds each run's files."""

    def __init__(self, processed_dir: str | os.PathLike, staging_root: str | os.PathLike, connect: Connect,
                 batch_rows: int = BATCH_ROWS):
        self.processed_dir = Path(processed_dir)
        self.staging_root = Path(staging_root)
        self.connect = connect
        self.batch_rows = batch_rows

    def prune_gone_buckets(self, keep: set[str]) -> list[str]:
        """Remove the store dirs of buckets the spec no longer has (their rows are dropped with
        them); returns the bucket ids removed."""
        return prune_gone_buckets(self.processed_dir, keep)

    @contextmanager
    def run(self, buckets: list[str], params: RenderParams, token: str = "") -> Iterator["StoreRun"]:
        """A run over these buckets, planned on entry: render() then finish(). Leaving it
        without finish() commits nothing (a rerun resumes from the journals); its files go."""
        run = StoreRun(self, list(buckets), params, token)
        try:
            run.plan()
            yield run
        finally:
            run.close()


class StoreRun:
    def __init__(self, store: ImageStore, buckets: list[str], params: RenderParams, token: str):
        self.store, self.buckets, self.params, self.token = store, buckets, params, token
        self.batch_rows = store.batch_rows
        self.processed_dir = store.processed_dir
        self.dir, self._lock = locked_run_dir(store.staging_root, STAGING_PREFIX)
        self.decided, self.todo, self.kept = self.dir / "decided.parquet", self.dir / "todo.parquet", self.dir / "kept.parquet"
        self.results, self.compact_src, self.moved = (self.dir / "results.parquet", self.dir / "compact-src.parquet",
                                                      self.dir / "moved.parquet")
        self.planned: dict[str, tuple[int, int]] = {}  # bucket -> (samples, to render)
        self.journal_rows = 0  # rows a killed run journaled (loaded by plan)
        self.unchanged = False  # plan found every committed row as it is: nothing to render, move or commit
        self.complete = False  # the committed table has every column (not a work dir from before one was added)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock)

    # -- plan ------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        return sum(n for n, _ in self.planned.values())

    @property
    def to_render(self) -> int:
        return sum(r for _, r in self.planned.values())

    @property
    def reused(self) -> int:
        return self.samples - self.to_render

    def plan(self) -> None:
        """Decide in DuckDB which planned samples are rendered and which rows are reused. When
        every planned sample keeps its committed row as it is (a no-op), the run then renders,
        moves and commits nothing."""
        with self.store.connect() as con:
            if self._unchanged_by_version(con):
                return
            self._load_packs(con)
            self._load_journals(con)
            cand = ["SELECT 0 AS origin, seq, image_id AS cand_image_id, "
                    + ", ".join(f'"{c}"' for c, _ in COLUMNS if c != "image_id") + " FROM _store_journal"]
            if table_exists(con, TABLE):
                have = {r[0] for r in con.execute(f'DESCRIBE "{TABLE}"').fetchall()}
                self.complete = all(c in have for c, _ in COLUMNS)
                cols = ", ".join(f'CAST("{c}" AS {t}) AS "{c}"' if c in have else f'NULL::{t} AS "{c}"'
                                 for c, t in COLUMNS if c != "image_id")
                cand.append(f'SELECT 1 AS origin, 0 AS seq, {"image_id" if "image_id" in have else "NULL"} AS cand_image_id, '
                            f'{cols} FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)')
            prev = ", ".join(f'r."{c}" AS "prev_{c}"' for c, _ in _RESULT_COLUMNS)
            # The plan is read once: each candidate still valid (a failure, or a record within a
            # pack on disk) is ranked among those with its bucket, key and fingerprint, and the
            # plan row takes the best one with its own fingerprint.
            decided = f"""
                WITH reusable AS (
                    SELECT c.* FROM ({" UNION ALL ".join(cand)}) c
                    LEFT JOIN _store_packs k ON k.bucket_id = c.bucket_id AND k.path = c.path
                    WHERE c.status IS DISTINCT FROM 'ok' OR c.pack_offset + c.bytes <= k.size
                    QUALIFY row_number() OVER (PARTITION BY c.bucket_id, c.key, c.fingerprint ORDER BY c.origin, c.seq DESC) = 1
                )
                SELECT p.*, r.key IS NOT NULL AS reuse,
                       -- the kept row would be the committed row itself (the same id under the same key)
                       coalesce(r.origin = 1 AND r.cand_image_id = p.image_id, false) AS as_committed, {prev}
                FROM ({PLAN_SQL}) p
                LEFT JOIN reusable r ON r.bucket_id = p.bucket_id AND r.key = p.key AND r.fingerprint = p.fingerprint"""
            params = {"buckets": self.buckets, **fingerprint_params(self.params)}
            # Decided once, into the run's staging dir; what follows reads that file (a no-op's
            # check included: the aggregate would cost as much as the join it summarises).
            # Under the stream cap: at 1M images this join under the full cap took the build
            # to 1.5 GB; under 256MB it spills (measured on the 1M work DB: 486 MB, 12.7 s).
            with streaming(con):
                con.execute(f"COPY ({decided}) TO $out (FORMAT parquet, ROW_GROUP_SIZE {self.batch_rows})",
                            {**params, "out": str(self.decided)})
            counts = con.execute(
                "SELECT bucket_id, count(*), count(*) FILTER (WHERE NOT reuse), count(*) FILTER (WHERE NOT as_committed) "
                "FROM read_parquet($src) GROUP BY bucket_id", {"src": str(self.decided)}).fetchall()
            self.planned = {b: (0, 0) for b in self.buckets} | {b: (n, r) for b, n, r, _ in counts}
            if self.complete and not self.journal_rows:
                committed = con.execute(f'SELECT count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)',
                                        {"buckets": self.buckets}).fetchone()[0]
                live = _pack_use(con, f'SELECT * FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)',
                                 {"buckets": self.buckets})
                if (all(d == 0 for *_, d in counts) and committed == sum(n for _, n, *_ in counts)
                        and not self._due_for_compaction(live) and not self._unreferenced_packs(live)):
                    self.unchanged = True
                    return
            # as_committed: the kept row is the committed row itself, which the commit leaves in place.
            kept = ", ".join(f'"prev_{c}" AS "{c}"' if (c, t) in _RESULT_COLUMNS else f'"{c}"' for c, t in COLUMNS)
            kept += ", as_committed"
            # The kept rows are not sorted: every reader of the table orders what it reads, and
            # at 1M images this sort of wide rows ran out of DuckDB memory under the 256MB
            # stream cap ("failed to pin block", scale.py sixth run, a rebuild removing a tar).
            with streaming(con):
                self._copy(con, f"SELECT {kept} FROM read_parquet($src) WHERE reuse", self.decided, self.kept)
                # Rendered in source order (file, then offset or row): each tar and parquet file
                # is read front to back, and a worker reads each parquet row group's images once.
                self._copy(con, f"SELECT {', '.join(TASK_COLUMNS)} FROM read_parquet($src) WHERE NOT reuse "
                                "ORDER BY location, data_offset, bucket_id, key", self.decided, self.todo)

    def _current_versions(self, con) -> dict[str, str] | None:
        """bucket -> the version its committed rows have if they are what a plan would keep: a
        digest of the plan inputs' versions, the settings and SQL of the plan, the bucket's
        committed row count and its packs on disk (path and size; a pack cut short or gone, or
        a stray one, changes it). None when an input has no version."""
        base = derived_version(con, PLAN_INPUTS, {"plan": PLAN_SQL, "fingerprint": FINGERPRINT_SQL,
                                                   "columns": COLUMNS, "params": fingerprint_params(self.params)})
        if base is None or not table_exists(con, TABLE):
            return None
        counts = dict(con.execute(f'SELECT bucket_id, count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id) '
                                  "GROUP BY bucket_id", {"buckets": self.buckets}).fetchall())
        return {b: hashlib.sha256(json.dumps([base, b, counts.get(b, 0), sorted(packs_on_disk(self.processed_dir, b))])
                                  .encode()).hexdigest() for b in self.buckets}

    def _recorded_versions(self, con) -> dict[str, str]:
        if not table_exists(con, VERSIONS_TABLE):
            return {}
        names = [_VERSION_PREFIX + b for b in self.buckets]
        return {n[len(_VERSION_PREFIX):]: v for n, v in con.execute(
            f'SELECT name, version FROM "{VERSIONS_TABLE}" WHERE list_contains($names, name)', {"names": names}).fetchall()}

    def _unchanged_by_version(self, con) -> bool:
        """A no-op decided without the plan: no journal, and every bucket's current version is
        the one recorded when it was last committed."""
        if any(journal_path(self.processed_dir, b).exists() for b in self.buckets):
            return False
        current = self._current_versions(con)
        if current is None or self._recorded_versions(con) != current:
            return False
        counts = dict(con.execute(f'SELECT bucket_id, count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id) '
                                  "GROUP BY bucket_id", {"buckets": self.buckets}).fetchall())
        self.planned = {b: (counts.get(b, 0), 0) for b in self.buckets}
        self.unchanged = True
        return True

    def _record_versions(self, con, versions: dict[str, str] | None) -> None:
        """Record these buckets' versions (after the commit and the prune); None forgets them."""
        with transaction(con, VERSIONS_TABLE):
            con.execute(f'CREATE TABLE IF NOT EXISTS "{VERSIONS_TABLE}" (name VARCHAR, version VARCHAR)')
            con.execute(f'DELETE FROM "{VERSIONS_TABLE}" WHERE list_contains($names, name)',
                        {"names": [_VERSION_PREFIX + b for b in self.buckets]})
            for b, v in (versions or {}).items():
                con.execute(f'INSERT INTO "{VERSIONS_TABLE}" VALUES (?, ?)', [_VERSION_PREFIX + b, v])

    def _copy(self, con, select: str, src: Path, out: Path) -> None:
        con.execute(f"COPY ({select}) TO $out (FORMAT parquet, ROW_GROUP_SIZE {self.batch_rows})",
                    {"src": str(src), "out": str(out)})

    def _load_packs(self, con) -> None:
        """_store_packs: the packs of the requested buckets on disk, with their sizes."""
        con.execute("CREATE OR REPLACE TEMP TABLE _store_packs (bucket_id VARCHAR, path VARCHAR, size BIGINT)")
        for b in self.buckets:
            for batch in _batched(packs_on_disk(self.processed_dir, b), self.batch_rows):
                _insert(con, "_store_packs", pa.table({"bucket_id": [b] * len(batch), "path": [p for p, _ in batch],
                                                       "size": pa.array([s for _, s in batch], pa.int64())}))

    def _load_journals(self, con) -> None:
        """_store_journal: every row the buckets' journals hold (a killed run's results), in
        journal order (`seq`), loaded in batches."""
        cols = ", ".join(f'"{c}" {t}' for c, t in COLUMNS)
        con.execute(f"CREATE OR REPLACE TEMP TABLE _store_journal (seq BIGINT, {cols})")
        seq = 0
        for b in self.buckets:
            for rows in read_batches(journal_path(self.processed_dir, b), self.batch_rows):
                table = rows_table([{**r, "bucket_id": b} for r in rows if isinstance(r.get("key"), str)], PROCESSED_SCHEMA)
                table = table.add_column(0, "seq", pa.array(range(seq, seq + len(table)), pa.int64()))
                seq += len(table)
                _insert(con, "_store_journal", table)
        self.journal_rows = seq

    # -- render ----------------------------------------------------------------------------
    def tasks(self) -> Iterator[RenderTask]:
        """The samples to render, in source order, read from the plan in batches."""
        for row in _read_rows(self.todo, self.batch_rows):
            yield RenderTask(**row, store_dir=store_dir(self.processed_dir, row["bucket_id"]), params=self.params,
                             store_token=self.token)

    def render(self, engine, report: Callable[[str], None] | None = None) -> None:
        """Render what the plan says through `engine.map("render", ...)` (tasks streamed in,
        results in input order): each result is journaled as it arrives (a killed run resumes
        from it) and written to the run's results in batches."""
        if self.unchanged:
            return
        progress = Progress("processed_images: images rendered", self.to_render, report)
        journal = Journal(self.processed_dir)
        writer = pq.ParquetWriter(self.results, PROCESSED_SCHEMA)
        batch: list[dict] = []
        try:
            for res in engine.map("render", self.tasks()):
                journal.append(res)
                failpoint("rendered")
                batch.append(res)
                if len(batch) >= self.batch_rows:
                    writer.write_table(pa.Table.from_pylist(batch, schema=PROCESSED_SCHEMA))
                    batch.clear()
                progress.advance()
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=PROCESSED_SCHEMA))
        finally:
            writer.close()
            journal.close()
            close_store_packs()
        progress.close()

    # -- compact, commit, prune --------------------------------------------------------------
    def finish(self) -> StoreSummary:
        self.compact()
        return self.commit()

    def _staged(self) -> list[str]:
        return [str(p) for p in (self.kept, self.results) if p.exists()]

    def compact(self) -> list[str]:
        """Buckets whose packs are mostly replaced records (or too many): their live records,
        streamed in key order, are copied into one new pack each; the new locations are staged
        for the commit. Returns the buckets compacted."""
        if self.unchanged:  # plan found no bucket due
            return []
        with self.store.connect() as con:
            live = _pack_use(con, "SELECT * FROM read_parquet($src, union_by_name = true)", {"src": self._staged()})
            due = self._due_for_compaction(live)
            if not due:
                return []
            con.execute(
                f"""COPY (SELECT bucket_id, key, status, path, pack_offset, bytes FROM read_parquet($src, union_by_name = true)
                          WHERE status = 'ok' AND list_contains($due, bucket_id) ORDER BY bucket_id, key)
                    TO $out (FORMAT parquet, ROW_GROUP_SIZE {self.batch_rows})""",
                {"src": self._staged(), "due": due, "out": str(self.compact_src)},
            )
        with pq.ParquetWriter(self.moved, _MOVED_SCHEMA) as writer:
            for b, rows in itertools.groupby(_read_rows(self.compact_src, self.batch_rows), key=itemgetter("bucket_id")):
                moved = ({"bucket_id": b, "key": r["key"], "path": r["path"], "pack_offset": r["pack_offset"]}
                         for r in compact(store_dir(self.processed_dir, b), rows))
                for batch in _batched(moved, self.batch_rows):
                    writer.write_table(pa.Table.from_pylist(batch, schema=_MOVED_SCHEMA))
        return due

    def _due_for_compaction(self, live: dict[str, tuple[int, set[str]]]) -> list[str]:
        """The buckets whose packs that `live` records point into (bucket -> (bytes of ok records,
        their packs)) are mostly replaced records. Packs no live record points into are not
        counted: the commit's prune deletes them whole, so a full re-render (a new quality, say)
        compacts nothing."""
        due = []
        for b in self.buckets:
            live_bytes, used = live.get(b, (0, set()))
            sizes = [s for p, s in packs_on_disk(self.processed_dir, b) if p in used]
            if sizes and needs_compaction(live_bytes, sum(sizes), len(sizes)):
                due.append(b)
        return due

    def _unreferenced_packs(self, live: dict[str, tuple[int, set[str]]]) -> bool:
        """Whether a bucket's store dir holds a pack no live record points into (left by a
        killed run, say): a build that would otherwise be a no-op commits, so the prune runs."""
        return any(p not in live.get(b, (0, set()))[1] for b in self.buckets for p, _ in packs_on_disk(self.processed_dir, b))

    def commit(self) -> StoreSummary:
        """Replace the partitions' rows with this run's in one transaction, then drop the
        journals and prune the packs nothing references. Returns what the partitions hold."""
        cols = ", ".join(f'"{c}"' for c, _ in COLUMNS)
        rows = "SELECT * FROM read_parquet($src, union_by_name = true)"
        if self.moved.exists():
            rows = f"""SELECT s.* REPLACE (coalesce(m.path, s.path) AS path,
                                           coalesce(m.pack_offset, s.pack_offset) AS pack_offset)
                       FROM ({rows}) s LEFT JOIN read_parquet($moved) m ON m.bucket_id = s.bucket_id AND m.key = s.key"""
        params = {"src": self._staged(), **({"moved": str(self.moved)} if self.moved.exists() else {})}
        mine = {"buckets": self.buckets}
        with self.store.connect() as con:
            if not self._as_committed(con):
                with transaction(con, TABLE):
                    _ensure_table(con)
                    self._record_versions(con, None)  # recorded again once pruned
                    if self.complete and self.kept.exists() and not self.moved.exists():
                        # Only what changed is written: a committed row the plan keeps as it is
                        # stays (at 1M images, replacing every row cost more than adding a tar's).
                        con.execute(
                            f"""DELETE FROM "{TABLE}" t WHERE list_contains($buckets, t.bucket_id) AND NOT EXISTS (
                                    SELECT 1 FROM read_parquet($kept) k
                                    WHERE k.as_committed AND k.bucket_id = t.bucket_id AND k.key = t.key)""",
                            {**mine, "kept": str(self.kept)})
                        con.execute(f'INSERT INTO "{TABLE}" BY NAME SELECT {cols} FROM ({rows}) '
                                    "WHERE as_committed IS NOT TRUE", params)
                    else:
                        con.execute(f'DELETE FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)', mine)
                        if params["src"]:
                            con.execute(f'INSERT INTO "{TABLE}" BY NAME SELECT {cols} FROM ({rows})', params)
                    n = con.execute(f'SELECT count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)',
                                    mine).fetchone()[0]
                    if n != self.samples:  # rolled back: the rows a plan of these samples leaves, or none
                        raise RuntimeError(f"{TABLE}: the commit left {n} rows for {self.samples} planned samples")
            for b in self.buckets:
                journal_path(self.processed_dir, b).unlink(missing_ok=True)
            self.prune(con)
            self._record_versions(con, self._current_versions(con))
            return self._summary(con)

    def _as_committed(self, con) -> bool:
        """Whether the partitions' committed rows are already exactly this run's (nothing was
        rendered, journaled or moved, every kept row is the committed row itself and the table
        holds no other row of these buckets): then a no-op build does not rewrite the table."""
        if self.unchanged:
            return True
        if self.to_render or self.journal_rows or self.moved.exists() or not table_exists(con, TABLE):
            return False
        params = {"buckets": self.buckets}
        n_mine = con.execute(f'SELECT count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)',
                             params).fetchone()[0]
        if not self.kept.exists():
            return n_mine == 0
        if not self.complete:  # a committed row lacking a column is never the kept row itself
            return False
        # A row marked as_committed is the committed row (same id, key and fingerprint; its
        # results read from it), one per key: equal counts then mean equal multisets.
        n_kept, n_other = con.execute("SELECT count(*), count(*) FILTER (WHERE NOT as_committed) FROM read_parquet($kept)",
                                      {"kept": str(self.kept)}).fetchone()
        return n_kept == n_mine and n_other == 0

    def prune(self, con) -> int:
        """Delete the files of these buckets' store dirs that no committed row references
        (replaced or compacted packs, a killed run's packs and temp files); an emptied dir
        goes too. The listing goes to DuckDB in batches and the anti-join says what to delete."""
        con.execute("CREATE OR REPLACE TEMP TABLE _store_files (path VARCHAR)")
        for b in self.buckets:
            d = store_dir(self.processed_dir, b)
            if not os.path.isdir(d):
                continue
            remove_stale_temps(d)
            with os.scandir(d) as entries:
                files = (e.path for e in entries if e.name != JOURNAL_NAME and not e.is_dir(follow_symlinks=False))
                for batch in _batched(files, self.batch_rows):
                    _insert(con, "_store_files", pa.table({"path": pa.array(batch, pa.string())}))
        gone = con.execute(
            f"""SELECT f.path FROM _store_files f
                ANTI JOIN (SELECT DISTINCT path FROM "{TABLE}" WHERE list_contains($buckets, bucket_id)
                           AND status = 'ok' AND path IS NOT NULL) p ON p.path = f.path""",
            {"buckets": self.buckets},
        ).to_arrow_reader(self.batch_rows)
        n = 0
        for batch in gone:
            for path in batch.column("path").to_pylist():
                os.unlink(path)
                n += 1
        for b in self.buckets:
            d = Path(store_dir(self.processed_dir, b))
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        return n

    def _summary(self, con) -> StoreSummary:
        per: dict[str, list[tuple[str, int]]] = {b: [] for b in self.buckets}
        for b, status, n in con.execute(
            f'SELECT bucket_id, status, count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id) '
            "GROUP BY ALL ORDER BY ALL", {"buckets": self.buckets}).fetchall():
            per[b].append((status, n))
        statuses = con.execute(
            f'SELECT status, count(*) FROM "{TABLE}" WHERE list_contains($buckets, bucket_id) GROUP BY ALL ORDER BY ALL',
            {"buckets": self.buckets}).fetchall()
        return StoreSummary(
            tuple(BucketSummary(b, sum(n for _, n in per[b]), self.planned.get(b, (0, 0))[1], tuple(per[b]))
                  for b in self.buckets),
            tuple((s, n) for s, n in statuses),
        )


def _pack_use(con, rows_sql: str, params: dict) -> dict[str, tuple[int, set[str]]]:
    """bucket -> (bytes of its ok records, the packs they point into) over `rows_sql`'s rows
    (a few packs per bucket: compaction bounds them)."""
    return {b: (n, set(paths or ())) for b, n, paths in con.execute(
        f"SELECT bucket_id, coalesce(sum(bytes) FILTER (WHERE status = 'ok'), 0), "
        f"list(DISTINCT path) FILTER (WHERE status = 'ok' AND path IS NOT NULL) FROM ({rows_sql}) GROUP BY bucket_id",
        params).fetchall()}


def packs_on_disk(processed_dir: str | os.PathLike, bucket_id: str) -> list[tuple[str, int]]:
    """(path, size) of the packs in a bucket's store dir (a few: compaction bounds them)."""
    try:
        entries = os.scandir(store_dir(processed_dir, bucket_id))
    except (FileNotFoundError, NotADirectoryError):
        return []
    with entries:
        return [(e.path, e.stat(follow_symlinks=False).st_size) for e in entries
                if is_pack(e.name) and e.is_file(follow_symlinks=False)]


def _ensure_table(con) -> None:
    cols = ", ".join(f'"{c}" {t}' for c, t in COLUMNS)
    con.execute(f'CREATE TABLE IF NOT EXISTS "{TABLE}" ({cols})')
    # A work dir from an older version may lack columns added since: add them (NULL for the
    # other partitions' rows, which their next run fills) instead of failing.
    have = {r[0] for r in con.execute(f'DESCRIBE "{TABLE}"').fetchall()}
    for c, t in COLUMNS:
        if c not in have:
            con.execute(f'ALTER TABLE "{TABLE}" ADD COLUMN "{c}" {t}')


def _insert(con, table: str, batch: pa.Table) -> None:
    con.register("_store_batch", batch)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _store_batch")
    finally:
        con.unregister("_store_batch")


def _read_rows(path: Path, batch_rows: int) -> Iterator[dict]:
    # pre_buffer (pyarrow's default) keeps what it read ahead for the whole file: memory that
    # followed the file's length.
    with pq.ParquetFile(path, pre_buffer=False) as f:
        for batch in f.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch
