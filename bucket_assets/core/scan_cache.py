"""The scan cache: the raw index rebuilt from per-unit scan results, scanning only what changed.

A source is a list of scan units, in the order its reader reads them:

    webdataset  each tar (sorted glob matches)                 fingerprint: lstat of the tar (+ of its
                                                               img2dataset <shard>.parquet, or its absence)
    parquet     each parquet file (sorted glob/list matches)   lstat of the file (+ the image dir's image entries)
    folder      each directory (os.walk order, sorted)         its entries' names and lstat (+ the
                with images                                    lstat of the metadata file above it)
                each metadata.jsonl/csv, after its subtree     its lstat + its subtree's listings
    urls        each metadata parquet (sorted glob matches)    lstat of the file (+ its url_downloads rows)

and a unit is scanned in parts of at most PART_RECORDS records (a tar is one part; parquet and
URL files are split by rows, folder directories by sorted file name), so one big file or flat
directory still spreads over every worker.

Each part's result lives under `work_dir/scan/<source>/<uid>.<key>.parquet` (its rows) and
`<uid>.<key>.json` (its summary: row count, skip counts, notes, the fingerprint seen), where uid
names the unit and key digests the source's settings (its spec config, captions.max_chars,
image.max_pixels, SCAN_VERSION, PART_RECORDS), the unit, its fingerprint and the part's range.
The worker writes the fragment, then the summary, each atomically: the summary's rename is the
commit point. A killed scan leaves at worst a temp file or a fragment without a summary, never
used (and removed), while every part committed before the kill is reused by the next build. A
part whose unit changed while it was scanned is not committed (scan_part). A URL part also
records a digest of the url_downloads rows of its ids; it is reused only while the table still
gives the same digest (checked here in SQL, one query per source).

`ScanCache.build` lists the units, decides from stat and listings alone which parts to scan
(a no-op build opens no source file), runs those on the compute engine, then builds raw_index
in DuckDB from the fragments of the current parts, in spec order (`read_parquet`, numbered from
per-part row counts), finds ids in two sources (DuplicateIdError) and rows of a URL source
whose id an earlier file or part of it already had (their duplicate form) in SQL, writes
scan_skips from the summaries, and removes what belongs to no current part. The coordinator
holds the list of parts and their summaries, never the records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.atomic import atomic_writer, remove_stale_temps
from bucket_assets.core.db import replace_table, set_table_version, streaming, table_exists, transaction
from bucket_assets.core.progress import Progress
from bucket_assets.core.raw_index import (
    RAW_INDEX_SCHEMA, SCAN_VERSION, DuplicateIdError, ScanTask, downloads_digest, scan_skips_table, summary_path,
    unstable_path,
)
from bucket_assets.core.sources import MAX_NOTES, ScanStats
from bucket_assets.core.sources.parquet import SourceError, num_rows
from bucket_assets.spec import FolderSource, ParquetSource, Source, Spec, UrlSource, WebDatasetSource

PART_RECORDS = 8192  # records per part; part of every key (changing it rescans everything)
SCAN_DIR = "scan"

# The digest scan_part records (raw_index.downloads_digest), from the table: per URL fragment,
# over the url_downloads rows of the fragment's ids.
DOWNLOADS_DIGEST_SQL = """
SELECT f.filename, count(*)::VARCHAR, sum(md5_number_upper(d.s))::VARCHAR, sum(md5_number_lower(d.s))::VARCHAR
FROM (SELECT DISTINCT filename, image_id FROM read_parquet($files, filename = true)
      WHERE issue IS DISTINCT FROM 'missing_id') f
JOIN (SELECT image_id, concat_ws(chr(31), coalesce(image_id, chr(30)), coalesce(url, chr(30)),
                                 coalesce(status, chr(30)), coalesce(detail, chr(30)), coalesce(sha256, chr(30))) AS s
      FROM url_downloads WHERE source = $source) d USING (image_id)
GROUP BY f.filename
"""

# Columns a row of a URL source loses when an earlier file or part of the source has its id.
_DUP_NULLED = ("location", "member", "data_offset", "byte_size", "sha256", "width", "height", "format", "mode",
               "orientation", "caption", "caption_field", "url", "similarity", "nsfw", "license", "orig_w", "orig_h")


# Bump when raw_index is written differently from the same fragments: the kept table is then rebuilt.
RAW_INDEX_STATE_VERSION = 1


def _raw_index_state(con: duckdb.DuckDBPyConnection) -> tuple[str, int | None] | None:
    """The digest of the parts raw_index was last written from and their number (None when the
    table is from before it was recorded); None: unknown, rewrite it."""
    if not (table_exists(con, "raw_index") and table_exists(con, "raw_index_state")):
        return None
    has_parts = "parts" in {r[0] for r in con.execute("DESCRIBE raw_index_state").fetchall()}
    row = con.execute(f"SELECT max(digest), {'max(parts)' if has_parts else 'NULL'}, count(*) FROM raw_index_state").fetchone()
    return (row[0], row[1]) if row[2] == 1 else None


@dataclass
class Part:
    source: Source
    unit: str
    uid: str  # names the unit (its files in the cache start with it)
    fingerprint: str
    start: int
    stop: int | None
    key: str
    fragment: Path
    reuse: bool = False
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    digest: list[str] | None = None
    committed: bool = True  # False: scanned while its unit changed; used once, not kept


@dataclass
class ScanOutcome:
    stats: ScanStats
    rows: int
    units_scanned: int
    units_reused: int
    units_removed: int
    parts_scanned: int
    parts_reused: int
    units_changed_while_scanned: int


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _uid(unit: str) -> str:
    return hashlib.sha256(os.fsencode(unit)).hexdigest()[:16]


def _read_summary(path: Path) -> dict | None:
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("version") == SCAN_VERSION and s.get("stable") else None


class ScanCache:
    """The scan cache of one spec's sources under `work_dir/scan` (see the module doc)."""

    def __init__(self, spec: Spec, engine, report: Callable[[str], None] | None = None):
        self.spec, self.engine, self.report = spec, engine, report
        self.root = Path(spec.work_dir) / SCAN_DIR
        self.parts: list[Part] = []
        self.exports: dict[str, str | None] = {}  # URL source -> its url_downloads export
        self.units_removed = 0

    # The lifecycle ------------------------------------------------------------------------
    def build(self, db: Callable[[], ContextManager[duckdb.DuckDBPyConnection]]) -> ScanOutcome:
        """Plan, scan what changed, write raw_index and scan_skips (one transaction), clean up.
        `db()` opens the catalog; it is held only to plan and to write, not while scanning."""
        with db() as con:
            self._plan(con)
        self._scan()
        stats = self._stats()
        with db() as con, streaming(con):
            with transaction(con, "raw_index"):
                rows = self._write(con, stats)
        self._prune()
        units: dict[tuple[str, str], bool] = {}
        for p in self.parts:
            k = (p.source.name, p.uid)
            units[k] = units.get(k, True) and p.reuse
        return ScanOutcome(
            stats=stats, rows=rows, units_scanned=sum(not r for r in units.values()),
            units_reused=sum(units.values()), units_removed=self.units_removed,
            parts_scanned=sum(not p.reuse for p in self.parts), parts_reused=sum(p.reuse for p in self.parts),
            units_changed_while_scanned=len({(p.source.name, p.uid) for p in self.parts if not p.committed}),
        )

    # Units and parts ----------------------------------------------------------------------
    def settings(self, source: Source) -> str:
        """What every record of the source depends on besides its unit: its spec config (not the
        caption variant's name or download settings, which the scan does not read), the caption
        and pixel limits, the code's version and part size."""
        cfg = source.model_dump(mode="json", exclude={"download", "caption_variant"})
        extra = {"store": str(self.spec.downloads_dir)} if isinstance(source, UrlSource) else {}
        return _digest(SCAN_VERSION, PART_RECORDS, cfg, self.spec.captions.max_chars, self.spec.image.max_pixels, extra)

    @staticmethod
    def units(source: Source) -> Iterator[tuple[str, str, int | None]]:
        """(unit, fingerprint, records when known from the listing) in reading order."""
        from bucket_assets.core.sources import folder, parquet, urls, webdataset

        if isinstance(source, WebDatasetSource):
            for path in webdataset.unit_paths(source):
                yield path, webdataset.fingerprint(source, path), None
        elif isinstance(source, ParquetSource):
            for path in parquet.files(source):
                yield path, parquet.fingerprint(source, path), None
        elif isinstance(source, FolderSource):
            yield from folder.units(source)  # directories with images, then each metadata file
        else:
            for path in urls.files(source):
                yield path, urls.fingerprint(path), None

    def _ranges(self, source: Source, unit: str, part0: Callable[[int, int | None], Path | None],
                records: int | None) -> list[tuple[int, int | None]]:
        if isinstance(source, WebDatasetSource):
            return [(0, None)]
        if isinstance(source, FolderSource):
            n = records or 0
        else:
            # The row count of a file whose first part is committed is in that part's summary;
            # otherwise (a new or changed file) it is read from the footer.
            summary = part0(0, PART_RECORDS)
            s = _read_summary(summary) if summary is not None else None
            n = s.get("unit_rows") if s is not None else num_rows(unit)
            n = n or 0
        return [(i * PART_RECORDS, (i + 1) * PART_RECORDS) for i in range(max(1, math.ceil(n / PART_RECORDS)))]

    def _plan(self, con: duckdb.DuckDBPyConnection) -> None:
        remove_stale_temps(self.root)
        self.parts, self.exports, self.units_removed = [], {}, 0
        names = {s.name for s in self.spec.sources}
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and d.name not in names:
                    self.units_removed += len({f.split(".", 1)[0] for f in os.listdir(d) if f.endswith(".json")})
        for source in self.spec.sources:
            d = self.root / source.name
            existing = set(os.listdir(d)) if d.is_dir() else set()
            settings = self.settings(source)
            current: set[str] = set()
            mine: list[Part] = []
            for unit, fp, records in self.units(source):
                uid = _uid(unit)
                current.add(uid)

                def name(start: int, stop: int | None) -> str:
                    return f"{uid}.{_digest(settings, unit, fp, start, stop)[:32]}"

                def committed(start: int, stop: int | None) -> Path | None:
                    n = name(start, stop)
                    return d / f"{n}.json" if f"{n}.json" in existing and f"{n}.parquet" in existing else None

                for start, stop in self._ranges(source, unit, committed, records):
                    n = name(start, stop)
                    p = Part(source, unit, uid, fp, start, stop, n.split(".", 1)[1], d / f"{n}.parquet")
                    s = _read_summary(d / f"{n}.json") if committed(start, stop) is not None else None
                    if s is not None:
                        p.reuse = True
                        self._take(p, s)
                    mine.append(p)
            self.units_removed += len({f.split(".", 1)[0] for f in existing if f.endswith(".json")} - current)
            if isinstance(source, UrlSource):
                self._check_downloads(con, source, mine)
                if any(not p.reuse for p in mine):
                    self.exports[source.name] = self._export_downloads(con, source, d)
            self.parts += mine

    def _check_downloads(self, con: duckdb.DuckDBPyConnection, source: UrlSource, parts: list[Part]) -> None:
        """A reused URL part stays reused only if url_downloads gives its ids the digest it was
        scanned with; otherwise its summary is dropped first (a kill then cannot pair the old
        summary with a new fragment) and it is scanned again."""
        reused = [p for p in parts if p.reuse]
        if not reused:
            return
        now: dict[str, list[str]] = {}
        if table_exists(con, "url_downloads"):
            for filename, *digest in con.execute(
                DOWNLOADS_DIGEST_SQL, {"files": [str(p.fragment) for p in reused], "source": source.name}
            ).fetchall():
                now[filename] = digest
        empty = downloads_digest([])
        for p in reused:
            if now.get(str(p.fragment), empty) != p.digest:
                os.unlink(summary_path(p.fragment))
                p.reuse, p.rows, p.counts, p.files, p.notes, p.digest = False, 0, {}, {}, [], None

    def _export_downloads(self, con: duckdb.DuckDBPyConnection, source: UrlSource, d: Path) -> str | None:
        """The source's url_downloads rows as a parquet file the scan workers read (they never
        open DuckDB), streamed in batches."""
        if not table_exists(con, "url_downloads"):
            return None
        path = d / "downloads.parquet"
        reader = con.execute(
            "SELECT image_id, url, status, detail, sha256 FROM url_downloads WHERE source = ? ORDER BY image_id",
            [source.name],
        ).to_arrow_reader(65536)
        with atomic_writer(path) as f:
            writer = pq.ParquetWriter(f, reader.schema)
            try:
                for batch in reader:
                    writer.write_batch(batch)
            finally:
                writer.close()
        return str(path)

    @staticmethod
    def _take(p: Part, s: dict) -> None:
        p.rows, p.counts, p.files, p.notes = int(s["rows"]), dict(s["counts"]), dict(s["files"]), list(s["notes"])
        p.digest = s.get("downloads_digest")

    # Scanning ------------------------------------------------------------------------------
    def _task(self, p: Part) -> ScanTask:
        return ScanTask(
            source=p.source.model_dump(mode="json"), unit=p.unit, fingerprint=p.fingerprint, start=p.start,
            stop=p.stop, max_chars=self.spec.captions.max_chars, max_pixels=self.spec.image.max_pixels,
            fragment=str(p.fragment), downloads=self.exports.get(p.source.name),
            store=str(self.spec.downloads_dir) if isinstance(p.source, UrlSource) else None,
        )

    def _scan(self) -> None:
        todo = [p for p in self.parts if not p.reuse]
        progress = Progress("raw_index: source parts scanned", len(todo), self.report)
        results = self.engine.map("scan", (self._task(p) for p in todo))
        try:
            for p, s in zip(todo, results):
                if s.get("error"):
                    raise SourceError(s["error"])
                self._take(p, s)
                if not s["stable"]:
                    p.committed = False
                    p.fragment = Path(unstable_path(p.fragment))
                    p.notes.append(f"source {p.source.name}: {p.unit} changed while it was scanned: its records are "
                                   "used in this build but not kept (it is scanned again next build)")
                progress.advance()
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
        progress.close()

    def _stats(self) -> ScanStats:
        stats = ScanStats()
        for p in self.parts:
            for k, v in p.counts.items():
                stats.add(k, v)
            for k, v in p.files.items():
                stats.files[k] = stats.files.get(k, 0) + v
            if len(stats.notes) < MAX_NOTES:
                stats.notes.extend(p.notes[: MAX_NOTES - len(stats.notes)])
        return stats

    # The tables ----------------------------------------------------------------------------
    def _write(self, con: duckdb.DuckDBPyConnection, stats: ScanStats) -> int:
        files, bases, url_files = [], [], []
        base = 0
        for p in self.parts:
            if p.rows:
                files.append(str(p.fragment))
                bases.append(base)
                if isinstance(p.source, UrlSource):
                    url_files.append(str(p.fragment))
                base += p.rows
        replace_table(con, "scan_skips", scan_skips_table(stats))
        # raw_index is a function of the parts' fragments and their order. A fragment's name
        # digests everything its part depends on but a URL part's download rows, whose digest
        # its summary records: when names, row bases and digests are those the last build wrote
        # the table from, it is kept as it is (a no-op build neither reads the fragments nor
        # rewrites it).
        state = start = None
        digests = [p.digest for p in self.parts if p.rows]

        def digest_of(n: int) -> str:  # the state of raw_index written from the first n of these parts
            return _digest(RAW_INDEX_STATE_VERSION, [f.name for f in RAW_INDEX_SCHEMA], len(self.spec.sources),
                           files[:n], bases[:n], url_files, digests[:n])

        if all(p.committed for p in self.parts):
            state = digest_of(len(files))
            last = _raw_index_state(con)
            if last is not None and last[0] == state:
                set_table_version(con, "raw_index", state)  # what the tables derived from it check
                return base
            # Parts added after the last ones (a new tar sorts last): the table holds the first
            # `n` parts' rows as they are, so only the new parts' rows are appended. URL sources
            # are rewritten (their duplicate ids are decided across parts).
            n = last[1] if last is not None else None
            if (n is not None and 0 < n < len(files) and not url_files and last[0] == digest_of(n)
                    and con.execute("SELECT count(*) FROM raw_index").fetchone()[0] == bases[n]):
                start = n
        if start is None:
            con.register("_raw_index_empty", RAW_INDEX_SCHEMA.empty_table())
            con.execute("CREATE OR REPLACE TABLE raw_index AS SELECT * FROM _raw_index_empty")
            con.unregister("_raw_index_empty")
            start = 0
        con.execute("CREATE OR REPLACE TABLE raw_index_state (digest VARCHAR, parts BIGINT)")
        if files[start:]:
            con.register("_scan_parts", pa.table({"filename": files, "base": pa.array(bases, pa.int64())}))
            try:
                self._insert(con, files[start:], bases[start:], url_files)
            finally:
                con.unregister("_scan_parts")
            if len(self.spec.sources) > 1:
                self._check_duplicate_ids(con)
        if state is not None:
            con.execute("INSERT INTO raw_index_state VALUES (?, ?)", [state, len(files)])
        set_table_version(con, "raw_index", state)
        return base

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, files: list[str], bases: list[int], url_files: list[str]) -> None:
        con.execute("CREATE OR REPLACE TEMP TABLE _scan_dups (row_id BIGINT)")
        if url_files:
            # A row of a URL source whose id an earlier row of the source has (in an earlier file
            # or part: within one part the worker already gave it this form) is that duplicate.
            con.execute(
                """INSERT INTO _scan_dups
                   SELECT row_id FROM (
                       SELECT p.base + t.file_row_number AS row_id, t.issue,
                              row_number() OVER (PARTITION BY t.source, t.image_id
                                                 ORDER BY p.base + t.file_row_number) AS k
                       FROM read_parquet($files, filename = true, file_row_number = true) t
                       JOIN _scan_parts p USING (filename)
                       WHERE t.issue IS DISTINCT FROM 'missing_id')
                   WHERE k > 1 AND issue IS DISTINCT FROM 'duplicate_id'""",
                {"files": url_files},
            )
        cols = []
        for f in RAW_INDEX_SCHEMA:
            if f.name == "row_id":
                cols.append("$base + t.file_row_number AS row_id")
            elif f.name in _DUP_NULLED:
                cols.append(f"CASE WHEN d.row_id IS NULL THEN t.{f.name} END AS {f.name}")
            elif f.name == "issue":
                cols.append("CASE WHEN d.row_id IS NULL THEN t.issue ELSE 'duplicate_id' END AS issue")
            elif f.name in ("issue_detail", "notes"):
                cols.append(f"CASE WHEN d.row_id IS NULL THEN t.{f.name} ELSE t.dup_{f.name} END AS {f.name}")
            else:
                cols.append(f"t.{f.name}")
        # One part at a time, in row order: the sort holds one part's rows (at most a unit's
        # records), not the whole index, and the table's rows lie in row_id order as before.
        for file, base in zip(files, bases):
            con.execute(
                f"""INSERT INTO raw_index
                    SELECT {', '.join(cols)}
                    FROM read_parquet($file, file_row_number = true) t
                    LEFT JOIN _scan_dups d ON d.row_id = $base + t.file_row_number
                    ORDER BY row_id""",
                {"file": file, "base": base},
            )
        con.execute("DROP TABLE _scan_dups")

    @staticmethod
    def _check_duplicate_ids(con: duckdb.DuckDBPyConnection) -> None:
        """An id in two sources is an error naming both: the first (in row order) row whose id an
        earlier source already has, as the scan in spec order would meet it. Rows without an id
        carry a made-up one and are left out."""
        hit = con.execute(
            """WITH firsts AS (
                   SELECT image_id, source, min(row_id) AS first FROM raw_index
                   WHERE issue IS DISTINCT FROM 'missing_id' GROUP BY image_id, source)
               SELECT image_id, list(source ORDER BY first) AS sources, list(first ORDER BY first) AS rows
               FROM firsts GROUP BY image_id HAVING count(*) > 1
               ORDER BY rows[2] LIMIT 1"""
        ).fetchone()
        if hit is not None:
            image_id, sources, _rows = hit
            raise DuplicateIdError(f"image_id {image_id!r} appears in two sources: {sources[0]!r} and {sources[1]!r}")

    # Cleaning up ---------------------------------------------------------------------------
    def _prune(self) -> None:
        """Remove what no current part uses: removed or changed units, uncommitted fragments,
        URL downloads exports, sources no longer in the spec."""
        if not self.root.is_dir():
            return
        keep: dict[str, set[str]] = {s.name: set() for s in self.spec.sources}
        for p in self.parts:
            if p.committed:
                keep[p.source.name] |= {p.fragment.name, Path(summary_path(p.fragment)).name}
        for d in self.root.iterdir():
            if d.name not in keep:
                if d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d)
                else:
                    d.unlink()
                continue
            for f in os.listdir(d):
                if f not in keep[d.name]:
                    try:
                        os.unlink(d / f)
                    except IsADirectoryError:
                        shutil.rmtree(d / f)
                    except FileNotFoundError:
                        pass
