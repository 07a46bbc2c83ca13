"""The export's shards of some bucket partitions and their rows in the metadata DB, for one run:
digest, plan, skip, build, record (the tar format, the plan rows and the shard fingerprints are
core/shards.py; staging and the manifest's publish are core/publish.py).

Nothing proportional to the dataset is held in Python:

    digest   (DB lock)  per bucket, the count and two hash aggregates of every plan column that
                        goes into its shards' bytes (shards.plan_digests): a bucket whose digest
                        is the one recorded with its shard_files rows, and whose shard files are
                        still the files recorded (size, mtime_ns, inode), is done: its rows stay
                        as they are and nothing of it is planned, read or written
    plan     (DB lock)  the other buckets' sample plan -> a parquet file in the work dir
    build    (no lock)  the plan streamed in batches, split into shards as it goes by
                        (shards.plan_bucket_shards); a shard whose content fingerprint and file are
                        those recorded is skipped, every other one is a task on the compute engine
                        that reads its JPEG bytes from the store and stages it if they changed
    record   (DB lock)  one transaction: the changed buckets' shard_files rows replaced, and their
                        shard_samples rows derived in SQL from the plan and the shards' key ranges

export_manifest then publishes the staged files together with the manifest that lists them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

import pyarrow as pa

from bucket_assets.core.atomic import remove_stale_temps
from bucket_assets.core.db import replace_partitions, streaming, table_exists, transaction
from bucket_assets.core.publish import (
    DIFFERENT,
    UNCHANGED,
    file_identity,
    shard_state,
    staged_path,
    staging_dir,
)
from bucket_assets.core.shards import (
    PlannedShard,
    iter_sample_plan,
    plan_bucket_shards,
    plan_digests_and_ranges,
    range_digests,
    write_sample_plan,
)

# One row per shard: where it is and what it holds (the manifest lists these), its content
# fingerprint and the key range it covers, the identity (size, mtime_ns, inode) of the file the
# build left for it, so the next build skips it while both still hold (core.publish.shard_state),
# its bucket's plan digest, so the next build skips the whole bucket while that holds too, and the
# plan digest of its key range (shards.range_digests), so a changed bucket is planned again only
# from its first changed shard.
SHARD_FILES_SCHEMA = pa.schema(
    [("bucket_id", pa.string()), ("shard_index", pa.int32()), ("path", pa.string()),
     ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
     ("fingerprint", pa.string()), ("first_key", pa.string()), ("last_key", pa.string()),
     ("file_size", pa.int64()), ("mtime_ns", pa.int64()), ("inode", pa.uint64()),
     ("plan_digest", pa.string()), ("range_digest", pa.string())]
)
# What each written sample holds of its caption, so a sensor can tell which buckets a new
# caption selection changes without opening a shard. Derived in SQL from the run's sample plan
# and the shards' key ranges.
SHARD_SAMPLES_COLUMNS = (
    ("bucket_id", "VARCHAR"), ("shard_index", "INTEGER"), ("key", "VARCHAR"), ("image_id", "VARCHAR"),
    ("text", "VARCHAR"), ("caption_variant", "VARCHAR"), ("caption_selector_index", "INTEGER"),
    ("caption_source_id", "INTEGER"),
)
SHARD_SAMPLES_SQL = """
INSERT INTO shard_samples BY NAME
SELECT p.bucket_id, f.shard_index, p.key, p.image_id, p.text, p.caption_variant,
       CAST(p.caption_selector_index AS INTEGER) AS caption_selector_index,
       CAST(p.caption_source_id AS INTEGER) AS caption_source_id
FROM read_parquet($plan) p
JOIN shard_files f ON f.bucket_id = p.bucket_id AND p.key >= f.first_key AND p.key <= f.last_key
WHERE list_contains($buckets, p.bucket_id)
ORDER BY p.bucket_id, p.key
"""


@dataclass
class ShardRun:
    """What write_buckets did: a row per shard (SHARD_FILES_SCHEMA), bounded by the shard count."""

    rows: list[dict] = field(default_factory=list)
    unchanged: int = 0  # skipped by fingerprint: neither built nor read
    built: int = 0  # assembled, compared with the published file unless known to differ, staged if changed
    rewritten: int = 0  # files staged


def _shard_row(bucket_id: str, shard: PlannedShard, samples: int, nbytes: int, sha256: str,
               ident: tuple[int, int, int] | None, digest: str | None) -> dict:
    size, mtime_ns, inode = ident or (None, None, None)
    return {"bucket_id": bucket_id, "shard_index": shard.index, "path": shard.rel, "samples": samples,
            "bytes": nbytes, "sha256": sha256, "fingerprint": shard.fingerprint, "first_key": shard.first_key,
            "last_key": shard.last_key, "file_size": size, "mtime_ns": mtime_ns, "inode": inode,
            "plan_digest": digest, "range_digest": None}


def clear_staging_temps(out_dir: Path, bucket_id: str) -> None:
    """A killed run's half-written staged files of this bucket."""
    remove_stale_temps(staging_dir(out_dir) / "buckets" / bucket_id)


def write_buckets(out_dir: Path, bucket_ids: list[str], plan_rows: Iterable[dict], recorded: dict[tuple[str, int], dict],
                  max_samples: int, max_bytes: int, compute=None,
                  on_bucket: Callable[[str], None] | None = None,
                  digests: dict[str, str | None] | None = None,
                  first_index: dict[str, int] | None = None) -> ShardRun:
    """Stage the shards of these buckets from their sample plan rows (streamed in bucket, key
    order). Each bucket's rows are split into shards as they go by (core.shards.plan_bucket_shards);
    a shard whose content fingerprint and published file are those `recorded` by the last build
    ((bucket_id, shard_index) -> shard_files row) is skipped without reading anything. Every other
    shard is one task (`compute`: in process, or Celery workers) that reads its JPEG bytes from the
    store and stages it unless the published file already holds the same bytes. Tasks are made
    lazily, so memory holds the shards in flight, not the buckets. `on_bucket(bucket_id)` is
    called once a bucket's shards are all planned; `digests` (bucket -> plan digest) go into the
    rows; a bucket in `first_index` has rows only from that shard on (the shards before it stand)."""
    from bucket_assets.distributed import LocalCompute

    run = ShardRun()
    pending: collections.deque = collections.deque()
    wanted, seen = set(bucket_ids), set()
    digests, first_index = digests or {}, first_index or {}

    def plans() -> Iterator[dict]:
        for bucket_id, rows in itertools.groupby(plan_rows, key=operator.itemgetter("bucket_id")):
            if bucket_id in seen or bucket_id not in wanted:
                raise ValueError(f"sample plan: bucket {bucket_id} out of order or not requested")
            seen.add(bucket_id)
            clear_staging_temps(out_dir, bucket_id)
            digest = digests.get(bucket_id)
            for shard in plan_bucket_shards(rows, bucket_id, max_samples, max_bytes, first_index.get(bucket_id, 0)):
                prev = recorded.get((bucket_id, shard.index))
                ident = file_identity(out_dir / shard.rel)
                state = shard_state(shard.fingerprint, shard.rel, shard.file_bytes, prev, ident)
                if state == UNCHANGED:
                    run.rows.append(_shard_row(bucket_id, shard, prev["samples"], prev["bytes"], prev["sha256"], ident,
                                               digest))
                    run.unchanged += 1
                    continue
                pending.append((bucket_id, dataclasses.replace(shard, samples=[])))
                yield {"out_dir": str(out_dir), "rel": shard.rel, "samples": shard.samples,
                       "known_different": state == DIFFERENT}
            if on_bucket is not None:
                on_bucket(bucket_id)
        for bucket_id in bucket_ids:
            if bucket_id not in seen:
                clear_staging_temps(out_dir, bucket_id)  # an empty bucket: nothing to stage

    for res in (compute or LocalCompute(1)).map("shard", plans()):
        bucket_id, shard = pending.popleft()
        run.built += 1
        run.rewritten += res["rewritten"]
        # The file the manifest publish will leave at shard.rel: the staged one is renamed there.
        ident = file_identity(staged_path(out_dir, shard.rel, res["sha256"]) if res["rewritten"] else out_dir / shard.rel)
        run.rows.append(_shard_row(bucket_id, shard, res["samples"], res["bytes"], res["sha256"], ident,
                                   digests.get(bucket_id)))
    run.rows.sort(key=lambda r: (r["bucket_id"], r["shard_index"]))
    return run


def recorded_shards(con, bucket_ids: list[str]) -> dict[tuple[str, int], dict]:
    """The shard_files rows of these buckets (one per shard) by (bucket_id, shard_index); rows of
    a work dir from before fingerprints or digests lack those columns (None), so their shards are
    compared once."""
    if not table_exists(con, "shard_files"):
        return {}
    rows = con.execute("SELECT * FROM shard_files WHERE list_contains(?, bucket_id)", [bucket_ids]).to_arrow_table()
    names = SHARD_FILES_SCHEMA.names
    return {(r["bucket_id"], r["shard_index"]): {c: r.get(c) for c in names} for r in rows.to_pylist()}


def shards_as_recorded(con, bucket_ids: list[str], rows: list[dict], built: int,
                       recorded: dict[tuple[str, int], dict]) -> bool:
    """Whether these buckets' shard_files and shard_samples rows already say what `run` would
    record, so neither is rewritten: every shard was skipped as unchanged (its content
    fingerprint covers each sample's key, .txt and .json, so its shard_samples rows too), the
    new shard_files rows equal the recorded ones, and shard_samples holds as many rows of these
    buckets as the shards hold samples."""
    if built or len(rows) != len(recorded) or not table_exists(con, "shard_samples"):
        return False
    names = SHARD_FILES_SCHEMA.names
    for r in rows:
        prev = recorded.get((r["bucket_id"], r["shard_index"]))
        if prev is None or any(prev.get(c) != r.get(c) for c in names):
            return False
    n = con.execute("SELECT count(*) FROM shard_samples WHERE list_contains(?, bucket_id)", [bucket_ids]).fetchone()[0]
    return n == sum(r["samples"] for r in rows)


def record_shards(con, bucket_ids: list[str], rows: list[dict], plan: Path | None, max_samples: int, max_bytes: int,
                  first_index: dict[str, int] | None = None) -> int:
    """Replace these buckets' shard_files rows in one transaction, and their shard_samples rows
    from shard `first_index[bucket]` (default 0) on: those come from the plan file (which holds
    only those shards' samples) joined with the shards' key ranges; the new shards' range digests
    are computed in SQL. Returns the samples recorded."""
    first_index = first_index or {}
    starts = {b: first_index.get(b, 0) for b in bucket_ids}
    with transaction(con, "shard_files"):
        replace_partitions(con, "shard_files", pa.Table.from_pylist(rows, schema=SHARD_FILES_SCHEMA), bucket_ids)
        if not table_exists(con, "shard_samples"):
            con.execute(f"CREATE TABLE shard_samples ({', '.join(f'{c} {t}' for c, t in SHARD_SAMPLES_COLUMNS)})")
        have = {r[0] for r in con.execute("DESCRIBE shard_samples").fetchall()}
        for c, t in SHARD_SAMPLES_COLUMNS:  # a work dir from an older version
            if c not in have:
                con.execute(f"ALTER TABLE shard_samples ADD COLUMN {c} {t}")
        con.execute(
            """DELETE FROM shard_samples s
               USING (SELECT unnest($b::VARCHAR[]) AS bucket_id, unnest($i::INTEGER[]) AS start) x
               WHERE s.bucket_id = x.bucket_id AND s.shard_index >= x.start""",
            {"b": list(starts), "i": list(starts.values())})
        new = [r for r in rows if r["shard_index"] >= starts.get(r["bucket_id"], 0)]
        n = 0
        if plan is not None and new:
            n = con.execute(SHARD_SAMPLES_SQL, {"plan": str(plan), "buckets": bucket_ids}).fetchone()[0]
        if n != sum(r["samples"] for r in new):
            raise RuntimeError(f"shard_samples: {n} rows for {sum(r['samples'] for r in new)} samples in shards")
        if new:
            got = range_digests(con, starts, plan) if plan is not None else {}
            upd = [((b, i), bucket_digest(got.get((b, i)), max_samples, max_bytes))
                   for b, i in ((r["bucket_id"], r["shard_index"]) for r in new)]
            con.register("_range_digests", pa.table({"bucket_id": [k[0] for k, _ in upd],
                                                      "shard_index": pa.array([k[1] for k, _ in upd], pa.int32()),
                                                      "d": pa.array([d for _, d in upd], pa.string())}))
            con.execute("""UPDATE shard_files SET range_digest = u.d FROM _range_digests u
                           WHERE shard_files.bucket_id = u.bucket_id AND shard_files.shard_index = u.shard_index""")
            con.unregister("_range_digests")
    return n


def bucket_digest(raw: tuple[int, int, int] | None, max_samples: int, max_bytes: int) -> str | None:
    """A bucket's plan digest: its sample count and hash aggregates (shards.plan_digests) with
    everything else that decides its shards' bytes (the layout, the split settings, the DuckDB
    version whose hash() made the aggregates). None when the plan cannot vouch for the bytes."""
    import duckdb

    from bucket_assets.core.shards import SAMPLE_JSON_KEYS, SHARD_LAYOUT

    if raw is None:
        return None
    parts = [SHARD_LAYOUT, ",".join(SAMPLE_JSON_KEYS), duckdb.__version__, max_samples, max_bytes, *raw]
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def bucket_unchanged(out_dir: Path, has_samples: bool, digest: str | None, shards: list[dict]) -> bool:
    """Whether a bucket's recorded shards (its shard_files rows) stand as they are: each was
    recorded with this plan digest and a content fingerprint, and its file is still the file
    recorded (core.publish.shard_state). An empty bucket stands when it has no shards."""
    if not has_samples:
        return not shards
    if digest is None or not shards or [r["shard_index"] for r in shards] != list(range(len(shards))):
        return False
    for r in shards:
        if r.get("plan_digest") != digest or r.get("fingerprint") is None:
            return False
        ident = file_identity(out_dir / r["path"])
        if shard_state(r["fingerprint"], r["path"], r["file_size"], r, ident) != UNCHANGED:
            return False
    return True


@dataclass
class ShardSummary:
    """What a run over some buckets left: every shard_files row of them (bounded by the shard
    count), and what it did."""

    rows: list[dict]
    buckets_with_samples: int
    buckets_unchanged: int  # skipped by plan digest: nothing of them planned, read or written
    buckets_resumed: int  # changed buckets planned only from their first changed shard on
    unchanged: int  # shards skipped (by digest or by fingerprint)
    built: int
    rewritten: int
    recorded: bool  # whether shard_files / shard_samples were rewritten

    @property
    def samples(self) -> int:
        return sum(r["samples"] for r in self.rows)

    def by_bucket(self, bucket_ids: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {b: [] for b in bucket_ids}
        for r in self.rows:
            out.setdefault(r["bucket_id"], []).append(r)
        return out


class ShardWriter:
    """The shards of an export under `out_dir` and their rows in the metadata DB (`connect()`
    gives a locked connection, held only while SQL runs); plan files go under `tmp_dir`."""

    def __init__(self, out_dir: str | Path, tmp_dir: str | Path, connect: Callable[[], ContextManager],
                 max_samples: int, max_bytes: int):
        self.out_dir, self.tmp_dir, self.connect = Path(out_dir), Path(tmp_dir), connect
        self.max_samples, self.max_bytes = max_samples, max_bytes

    def run(self, bucket_ids: list[str], token: str, compute=None,
            on_start: Callable[[int], None] | None = None,
            on_bucket: Callable[[str], None] | None = None) -> ShardSummary:
        """Bring these buckets' shards and rows up to date. `on_start(n)` gets the number of
        buckets that will be planned, `on_bucket` is called as each of them is done."""
        keys = list(bucket_ids)
        plan = self.tmp_dir / f"sample-plan-{token}.parquet"
        with self.connect() as con, streaming(con):
            has_plan = table_exists(con, "processed_images")
            raw, ranges = plan_digests_and_ranges(con, keys) if has_plan else ({}, {})
            digests = {b: bucket_digest(raw.get(b), self.max_samples, self.max_bytes) for b in keys}
            recorded = recorded_shards(con, keys)
            per_bucket: dict[str, list[dict]] = {b: [] for b in keys}
            for (b, _i), r in sorted(recorded.items()):
                per_bucket[b].append(r)
            # Before both tables exist (a first build) every bucket is recorded, empty ones too.
            ready = table_exists(con, "shard_files") and table_exists(con, "shard_samples")
            kept = [b for b in keys if ready and bucket_unchanged(self.out_dir, b in raw, digests[b], per_bucket[b])]
            kept_set = set(kept)
            todo = [b for b in keys if b not in kept_set]
            first = self._first_changed([b for b in todo if ready and b in raw], per_bucket, ranges)
            if has_plan and todo:
                # Spilled to a file so the DB lock is not held while shards are written.
                write_sample_plan(con, todo, plan, {b: per_bucket[b][i - 1]["last_key"] for b, i in first.items()})
        for b in kept:
            clear_staging_temps(self.out_dir, b)
        filled = [b for b in todo if b in raw]
        if on_start is not None:
            on_start(len(filled))
        # The shards before a changed bucket's first planned one stand: their rows stay as they
        # are but for the bucket's new plan digest.
        standing = [{**r, "plan_digest": digests[b]} for b, i in first.items() for r in per_bucket[b][:i]]
        try:
            mine = {k: r for k, r in recorded.items() if k[0] not in kept_set and k[1] >= first.get(k[0], 0)}
            run = write_buckets(self.out_dir, todo, iter_sample_plan(plan) if has_plan and todo else iter(()), mine,
                                self.max_samples, self.max_bytes, compute, on_bucket=on_bucket, digests=digests,
                                first_index=first)
            wrote = False
            if todo:
                new_rows = sorted(standing + run.rows, key=lambda r: (r["bucket_id"], r["shard_index"]))
                before = {k: r for k, r in recorded.items() if k[0] not in kept_set}
                with self.connect() as con, streaming(con):
                    if not shards_as_recorded(con, todo, new_rows, run.built, before):
                        record_shards(con, todo, new_rows, plan if has_plan else None, self.max_samples,
                                      self.max_bytes, first)
                        wrote = True
        finally:
            plan.unlink(missing_ok=True)
        kept_rows = [r for b in kept for r in per_bucket[b]]
        rows = sorted(kept_rows + standing + run.rows, key=lambda r: (r["bucket_id"], r["shard_index"]))
        return ShardSummary(rows, sum(1 for b in keys if b in raw), len(kept), len(first),
                            len(kept_rows) + len(standing) + run.unchanged, run.built, run.rewritten, wrote)

    def _first_changed(self, buckets: list[str], per_bucket: dict[str, list[dict]],
                       now: dict[tuple[str, int], tuple[int, int, int] | None]) -> dict[str, int]:
        """bucket -> the index of the first shard to plan again, for the changed buckets whose
        first shards stand. Shard i stands while the digest of its key range is the one recorded
        and its file is the one recorded; the split is sequential, so the last shard of that run
        of matches is planned again with everything after it (a sample added after it may belong
        to it). Buckets with fewer than two such shards are planned whole (absent). `now`: the
        range digests of the plan (shards.plan_digests_and_ranges)."""
        cand = {b: 0 for b in buckets if per_bucket[b] and all(r.get("range_digest") for r in per_bucket[b])}
        out: dict[str, int] = {}
        for b in cand:
            m = 0
            for r in per_bucket[b]:
                if (r["shard_index"] != m or r.get("fingerprint") is None
                        or bucket_digest(now.get((b, m)), self.max_samples, self.max_bytes) != r["range_digest"]
                        or shard_state(r["fingerprint"], r["path"], r["file_size"], r,
                                       file_identity(self.out_dir / r["path"])) != UNCHANGED):
                    break
                m += 1
            if m >= 2:
                out[b] = m - 1
        return out


# The JPEGs of each recorded shard that the image stage encoded and measured at their bucket's
# target size (processed_images), by shard in manifest order (bucket, then path).
TRUSTED_JPEGS_SQL = """
SELECT f.bucket_id, f.path, p.sha256
FROM shard_samples s
JOIN shard_files f ON f.bucket_id = s.bucket_id AND f.shard_index = s.shard_index
JOIN processed_images p ON p.bucket_id = s.bucket_id AND p.key = s.key
JOIN bucket_assignments a ON a.image_id = p.image_id AND a.bucket_id = p.bucket_id
WHERE p.status = 'ok' AND p.width = a.target_w AND p.height = a.target_h
ORDER BY f.bucket_id, f.path
"""


class TrustedJpegs:
    """verify_export's `trusted_jpegs` as a function of (bucket_id, shard path): the sha256 of the
    shard's JPEGs the image stage encoded at the bucket's size, so verifying a shard hashes them
    instead of decoding them. Memory holds one batch and one shard's hashes, not the dataset's:
    on the first call (a no-op build never makes one) the hashes of every recorded shard are
    written in manifest order to a parquet file under `tmp_dir` (the DB lock is held for that
    only), which later calls read forward. A shard asked out of that order, or not recorded,
    gets none (its JPEGs are decoded). Use as a context manager: the file goes on exit."""

    def __init__(self, connect: Callable[[], ContextManager], tmp_dir: str | Path, token: str):
        self.connect, self.path = connect, Path(tmp_dir) / f"trusted-jpegs-{token}.parquet"
        self._groups: Iterator[tuple[tuple[str, str], frozenset]] | None = None
        self._head: tuple[tuple[str, str], frozenset] | None = None

    def _open(self) -> Iterator[tuple[tuple[str, str], frozenset]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con, streaming(con):
            if not all(table_exists(con, t) for t in ("shard_samples", "shard_files", "processed_images",
                                                      "bucket_assignments")):
                return
            con.execute(f"COPY ({TRUSTED_JPEGS_SQL}) TO $out (FORMAT parquet)", {"out": str(self.path)})
        for k, rows in itertools.groupby(iter_sample_plan(self.path), key=operator.itemgetter("bucket_id", "path")):
            yield k, frozenset(r["sha256"] for r in rows)

    def __call__(self, bucket_id: str, rel: str) -> frozenset:
        if self._groups is None:
            self._groups = self._open()
            self._head = next(self._groups, None)
        while self._head is not None and self._head[0] < (bucket_id, rel):
            self._head = next(self._groups, None)
        return self._head[1] if self._head is not None and self._head[0] == (bucket_id, rel) else frozenset()

    def __enter__(self) -> "TrustedJpegs":
        return self

    def __exit__(self, *exc) -> None:
        if self._groups is not None:
            self._groups.close()
        self.path.unlink(missing_ok=True)
