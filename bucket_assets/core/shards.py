"""Deterministic WebDataset tar shards: keys, per-sample JSON, shard planning, writing, reading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from bucket_assets.core.atomic import TMP_PREFIX, atomic_writer
from bucket_assets.core.db import table_exists
from bucket_assets.core.failpoints import failpoint

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this on close
MEMBER_EXTS = ("jpg", "txt", "json")
SHARD_NAME = "shard-{:06d}.tar"
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_HASHED_KEY = re.compile(r"-[0-9a-f]{12}$")
_MAX_KEY = 80  # USTAR names are 100 bytes; leave room for ".json"

# Per-sample JSON keys: the same set and types in every sample (null where unknown).
SAMPLE_JSON_KEYS = (
    "bucket_id", "caption_selector_index", "caption_source_id", "caption_variant", "image_id",
    "license", "nsfw", "similarity", "source", "source_meta", "src_h", "src_w", "target_h", "target_w", "url",
)


def sample_key(image_id: str) -> str:
    """A tar key for an image id: no dots (webdataset splits on them), only [A-Za-z0-9_-].

    Ids that are already safe keep their name; others are sanitised and get a short hash of the
    original id so two ids never collide.
    """
    safe = _KEY_SAFE.sub("_", image_id)
    # An id that already looks like a hashed key is hashed too, so it cannot equal another's.
    if safe == image_id and len(safe) <= _MAX_KEY and not _HASHED_KEY.search(safe):
        return safe
    digest = hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:12]
    return f"{safe[: _MAX_KEY - 13]}-{digest}"


def sample_json(meta: dict) -> bytes:
    missing = set(SAMPLE_JSON_KEYS) - meta.keys()
    extra = meta.keys() - set(SAMPLE_JSON_KEYS)
    if missing or extra:
        raise ValueError(f"sample json keys differ: missing {sorted(missing)}, extra {sorted(extra)}")
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def caption_txt(text: str) -> bytes:
    return (text.rstrip("\n") + "\n").encode("utf-8")


def _padded(n: int) -> int:
    return BLOCK + (n + BLOCK - 1) // BLOCK * BLOCK


def sample_tar_bytes(jpg_len: int, txt_len: int, json_len: int) -> int:
    """Bytes three members take in a tar (headers and block padding)."""
    return _padded(jpg_len) + _padded(txt_len) + _padded(json_len)


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    txt: bytes
    json: bytes

    @property
    def tar_bytes(self) -> int:
        return sample_tar_bytes(len(self.jpg), len(self.txt), len(self.json))


def tar_size(member_bytes: int) -> int:
    """Archive size for members totalling `member_bytes` (headers and padding included)."""
    raw = member_bytes + 2 * BLOCK
    return (raw + RECORD - 1) // RECORD * RECORD


def starts_new_shard(count: int, member_bytes: int, size: int, max_samples: int, max_bytes: int) -> bool:
    """The shard rule: a shard holding `count` samples of `member_bytes` (sample_tar_bytes
    summed) is closed before a sample of `size` when it is full or that sample would take it
    over max_bytes. An empty shard always takes the sample: one larger than max_bytes gets a
    shard of its own rather than being dropped."""
    return count > 0 and (count >= max_samples or tar_size(member_bytes + size) > max_bytes)


def plan_shards(sizes: list[int], max_samples: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split samples (in order) into [start, end) runs within both limits (starts_new_shard)."""
    runs = []
    start, acc = 0, 0
    for i, s in enumerate(sizes):
        if starts_new_shard(i - start, acc, s, max_samples, max_bytes):
            runs.append((start, i))
            start, acc = i, 0
        acc += s
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, b) -> int:
        self.h.update(b)
        if self.f is not None:  # None: hash only
            self.f.write(b)
        self.n += len(b)
        return len(b)


@dataclass(frozen=True)
class ShardFile:
    path: str
    samples: int
    bytes: int
    sha256: str
    rewritten: bool  # False when an identical file was already in place and was left untouched


def _write_tar(sink, samples: Iterable[Sample]) -> int:
    count = 0
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext, data in (("jpg", s.jpg), ("txt", s.txt), ("json", s.json)):
                tf.addfile(_tarinfo(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
            count += 1
            failpoint("shard_sample")  # crash tests: die mid-shard
    return count


def shard_file_bytes(member_bytes: int) -> int:
    """Size of a shard file whose members take `member_bytes` (sample_tar_bytes summed):
    tarfile ends it with two zero blocks and pads it to its 10240-byte record size."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_shard(path: str | os.PathLike, samples: Iterable[Sample] | Callable[[], Iterable[Sample]],
                same_as: str | os.PathLike | None = None, size: int | None = None,
                known_different: bool = False) -> ShardFile:
    """Write one USTAR shard atomically: fixed headers (mtime 0, uid/gid 0, mode 644).

    If the file at `same_as` (default: `path`) already holds the same bytes, nothing is written
    and `rewritten` is False: an unchanged file keeps its inode and mtime, so consumers that
    watch files see only real changes. When `samples` is a callable (so they can be read twice),
    a published file of the planned `size` (if given) is compared by hash before anything is
    written: an unchanged shard creates no temp file either (a no-op rebuild works on a
    read-only export), and a changed one of another size is built once, not twice.
    `known_different` (the caller knows the file at `same_as` holds other content) skips both
    comparisons: the shard is built once and that file is not read.
    """
    path = Path(path)
    same = Path(same_as) if same_as is not None else path
    if callable(samples) and known_different:
        samples = samples()
    elif callable(samples):
        make = samples
        if same.is_file() and (size is None or same.stat().st_size == size):
            sink = _HashingWriter(None)
            count = _write_tar(sink, make())
            if same.stat().st_size == sink.n and file_sha256(same) == sink.h.hexdigest():
                return ShardFile(str(path), count, sink.n, sink.h.hexdigest(), rewritten=False)
        samples = make()
    kept: list[bool] = []

    def unchanged() -> bool:
        kept.append(not known_different and same.is_file() and same.stat().st_size == sink.n and file_sha256(same) == sink.h.hexdigest())
        return kept[0]

    with atomic_writer(path, unchanged=unchanged) as f:
        sink = _HashingWriter(f)
        count = _write_tar(sink, samples)
    return ShardFile(str(path), count, sink.n, sink.h.hexdigest(), rewritten=not kept[0])


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order; raises ValueError on a malformed shard."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                raise ValueError(f"{Path(path).name}: member {m.name} is not a regular file")
            key, _, ext = m.name.partition(".")
            if key != current:
                if current is not None:
                    yield current, parts
                current, parts = key, {}
            if ext in parts:
                raise ValueError(f"{Path(path).name}: member {m.name} appears twice")
            parts[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    if current is not None:
        yield current, parts


def sample_meta(row: dict, bucket_id: str) -> bytes:
    """A sample's .json from its row of the sample plan."""
    return sample_json(
        {
            "bucket_id": bucket_id,
            "caption_selector_index": row["caption_selector_index"],
            "caption_source_id": row["caption_source_id"],
            "caption_variant": row["caption_variant"],
            "image_id": row["image_id"],
            "license": row["license"],
            "nsfw": row["nsfw"],
            "similarity": row["similarity"],
            "source": row["source"],
            # The source's own record (the tar's .json with its img2dataset parquet row, the
            # parquet row without the image, the imagefolder metadata row): scores and all.
            "source_meta": None if row.get("source_meta") is None else json.loads(row["source_meta"]),
            "src_h": row["src_h"],
            "src_w": row["src_w"],
            "target_h": row["target_h"],
            "target_w": row["target_w"],
            "url": row["url"],
        }
    )


# The ordered sample list of each bucket: what its shards will hold. jpg_sha256 is the stored
# JPEG's sha256 (processed_images), so a shard's content is known without reading the store.
_SAMPLE_ROWS = """
SELECT p.bucket_id, p.bytes AS jpg_bytes, p.sha256 AS jpg_sha256, p.key, p.path, p.pack_offset, p.image_id,
       r.source, a.src_w, a.src_h,
       a.target_w, a.target_h, sc.text, sc.caption_variant, sc.caption_selector_index,
       sc.caption_source_id, r.url, r.similarity, r.nsfw, r.license, r.source_meta
FROM {processed} p
JOIN bucket_assignments a ON a.image_id = p.image_id AND a.bucket_id = p.bucket_id
JOIN selected_captions sc ON sc.image_id = p.image_id
JOIN filtered_images f ON f.image_id = p.image_id AND f.decision = 'keep'
JOIN raw_index r ON r.row_id = f.row_id
WHERE list_contains($buckets, p.bucket_id) AND p.status = 'ok' AND sc.status <> 'dropped'
"""
SAMPLE_ROWS_SQL = _SAMPLE_ROWS.format(processed="processed_images")
# The same rows of the samples after a key per bucket ($after_b, $after_k; a NULL key: all of
# them): the store's rows are cut before the joins, so a bucket planned from its last shard joins
# that shard's samples, not the whole bucket's.
_SAMPLE_ROWS_AFTER = _SAMPLE_ROWS.format(processed="""(
    SELECT pi.* FROM processed_images pi
    JOIN (SELECT unnest($after_b::VARCHAR[]) AS bucket_id, unnest($after_k::VARCHAR[]) AS after_key) x
      ON x.bucket_id = pi.bucket_id AND (x.after_key IS NULL OR pi.key > x.after_key))""")
SAMPLE_PLAN_SQL = SAMPLE_ROWS_SQL + "ORDER BY p.bucket_id, p.key\n"

# Every plan column that goes into a shard's bytes (the key order and the split included): not
# the store location (path, pack_offset), which only says where the same JPEG bytes are read.
DIGEST_COLUMNS = (
    "key", "jpg_bytes", "jpg_sha256", "image_id", "source", "src_w", "src_h", "target_w", "target_h", "text",
    "caption_variant", "caption_selector_index", "caption_source_id", "url", "similarity", "nsfw", "license",
    "source_meta",
)


def _shard_aggregates(con, samples: str, params: dict, bucket_ids: list[str]) -> list[tuple]:
    """(bucket_id, shard_index, count, sum, bit_xor, unknown) over the samples of `samples` (SQL of
    sample-plan rows) of these buckets: two DuckDB hashes of each sample's DIGEST_COLUMNS summed
    and xor-ed (order-independent aggregates; `unknown` counts samples whose JPEG sha256 is not
    known), per recorded shard of the bucket whose key range holds the sample (after the previous
    shard's last key, up to its own; keys before the first shard count in it). shard_index is NULL
    for the samples after a bucket's last recorded shard, or of a bucket without shard rows. The
    hashes are taken before the ASOF join, so it sorts narrow rows. Bounded by the shard count."""
    cols = ", ".join(DIGEST_COLUMNS)
    ranged = table_exists(con, "shard_files") and "last_key" in {
        r[0] for r in con.execute("DESCRIBE shard_files").fetchall()}  # a work dir from before key ranges: none
    f = ("SELECT bucket_id, shard_index, last_key FROM shard_files WHERE list_contains($buckets, bucket_id)" if ranged
         else "SELECT NULL::VARCHAR AS bucket_id, NULL::INTEGER AS shard_index, NULL::VARCHAR AS last_key WHERE false")
    return con.execute(
        f"""WITH s AS (SELECT bucket_id, key, hash({cols})::HUGEINT AS h1, hash({cols}, 'digest') AS h2,
                              jpg_sha256 IS NULL OR jpg_sha256 = '' AS unknown
                       FROM ({samples}) WHERE list_contains($buckets, bucket_id)),
                 f AS ({f})
            SELECT s.bucket_id, f.shard_index, count(*), sum(h1), bit_xor(h2), count(*) FILTER (WHERE unknown)
            FROM s ASOF LEFT JOIN f ON f.bucket_id = s.bucket_id AND s.key <= f.last_key
            GROUP BY ALL""",
        {**params, "buckets": list(bucket_ids)},
    ).fetchall()


Digest = tuple[int, int, int]  # (count, sum, bit_xor)


def plan_digests_and_ranges(con, bucket_ids: list[str]
                            ) -> tuple[dict[str, Digest | None], dict[tuple[str, int], Digest | None]]:
    """In one pass over the plan (SAMPLE_ROWS_SQL): per bucket that has samples, (count, sum,
    bit_xor) of two DuckDB hashes of each sample's DIGEST_COLUMNS, computed where the plan is (no
    row reaches Python): equal digests mean equal sample lists, so equal shards; and the same
    aggregates per recorded shard of the bucket over the samples in its key range, as
    (bucket_id, shard_index) -> digest (a shard no sample falls in is missing). None where a
    JPEG sha256 is unknown (a store row from before it was recorded)."""
    totals: dict[str, list[int]] = {}
    ranges: dict[tuple[str, int], Digest | None] = {}
    for b, i, n, sm, x, unknown in _shard_aggregates(con, SAMPLE_ROWS_SQL, {}, bucket_ids):
        t = totals.setdefault(b, [0, 0, 0, 0])
        t[0], t[1], t[2], t[3] = t[0] + n, t[1] + int(sm), t[2] ^ int(x), t[3] + unknown
        if i is not None:
            ranges[(b, int(i))] = None if unknown else (int(n), int(sm), int(x))
    return {b: None if u else (n, sm, x) for b, (n, sm, x, u) in totals.items()}, ranges


def plan_digests(con, bucket_ids: list[str]) -> dict[str, Digest | None]:
    """The per-bucket digests of plan_digests_and_ranges."""
    return plan_digests_and_ranges(con, bucket_ids)[0]


def range_digests(con, starts: dict[str, int], plan: str | os.PathLike) -> dict[tuple[str, int], Digest | None]:
    """Per shard_files row of the buckets in `starts` from shard index `starts[bucket]` on: the
    digest of the samples of a sample plan file written by write_sample_plan with these starts
    (it holds only the samples of those shards) that fall in its key range, as in
    plan_digests_and_ranges."""
    rows = _shard_aggregates(con, "SELECT * FROM read_parquet($plan)", {"plan": str(plan)}, list(starts))
    return {(b, int(i)): None if unknown else (int(n), int(sm), int(x))
            for b, i, n, sm, x, unknown in rows if i is not None and int(i) >= starts[b]}


PLAN_ROW_GROUP = 8192  # rows per row group of the plan file: what a reader decodes at a time


def write_sample_plan(con, bucket_ids: list[str], path: str | os.PathLike, after: dict[str, str] | None = None) -> None:
    """Write the ordered sample lists of these buckets to a parquet file (row groups follow the
    bucket order, so reading one bucket back touches only its rows). A bucket in `after` gets
    only its samples with keys after that key (its earlier shards stand)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f"{TMP_PREFIX}{Path(path).name}")
    after = {b: (after or {}).get(b) for b in bucket_ids}
    con.execute(
        f"""COPY ({_SAMPLE_ROWS_AFTER} ORDER BY p.bucket_id, p.key)
            TO '{_sql_path(tmp)}' (FORMAT parquet, ROW_GROUP_SIZE {PLAN_ROW_GROUP})""",
        {"buckets": list(bucket_ids), "after_b": list(after), "after_k": list(after.values())},
    )
    os.replace(tmp, path)


def read_sample_plan(path: str | os.PathLike, bucket_id: str) -> list[dict]:
    """One bucket's rows of the plan file as a list (tests and benchmarks; builds stream it)."""
    import pyarrow.parquet as pq

    return pq.read_table(path, filters=[("bucket_id", "=", bucket_id)]).to_pylist()


def iter_sample_plan(path: str | os.PathLike, batch_rows: int = 4096) -> Iterator[dict]:
    """The plan file's rows in file order (bucket, then key), read in batches of `batch_rows`:
    memory holds one batch, whatever the number of samples."""
    import pyarrow.parquet as pq

    # pre_buffer (pyarrow's default) keeps what it read ahead for the whole file.
    with pq.ParquetFile(path, pre_buffer=False) as f:
        for batch in f.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()


# Bump when the bytes a shard's samples make change while the fingerprint's inputs stay the same
# (tar headers, member names or order, padding): every recorded fingerprint then differs.
SHARD_LAYOUT = "bucketed_shards_v1 ustar mtime0 uid0 mode644 jpg,txt,json"


def _field(h, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


@dataclass
class PlannedShard:
    """One shard as planned from the sample plan, before anything is read from the store."""

    index: int
    rel: str  # buckets/<bucket_id>/shard-NNNNNN.tar
    samples: list[dict]  # {key, path, pack_offset, jpg_bytes, txt, json}: what stage_planned_shard reads
    member_bytes: int  # sample_tar_bytes summed
    # sha256 over the layout, the path and each sample's key, JPEG sha256 and length, .txt and
    # .json bytes: equal fingerprints mean equal shard bytes. None when a JPEG's sha256 is not
    # known (a store row from before it was recorded): such a shard is always built.
    fingerprint: str | None
    first_key: str
    last_key: str

    @property
    def file_bytes(self) -> int:
        return shard_file_bytes(self.member_bytes)


def plan_bucket_shards(rows: Iterable[dict], bucket_id: str, max_samples: int, max_bytes: int,
                       first_index: int = 0) -> Iterator[PlannedShard]:
    """Split one bucket's sample-plan rows, streamed in key order, into shards (the rule of
    plan_shards), encoding each sample's .txt and .json once and fingerprinting each shard as its
    samples go by. Memory holds one shard's samples. Keys must strictly increase (raises
    ValueError otherwise): the shards are key ranges. The first shard is `first_index` (the
    rows then start right after the shards before it, which stand)."""
    index, samples, acc, h, known, prev = first_index, [], 0, None, True, None

    def start():
        h = hashlib.sha256()
        _field(h, SHARD_LAYOUT.encode())
        _field(h, f"buckets/{bucket_id}/{SHARD_NAME.format(index)}".encode())
        return h

    def done() -> PlannedShard:
        return PlannedShard(index, f"buckets/{bucket_id}/{SHARD_NAME.format(index)}", samples, acc,
                            h.hexdigest() if known else None, samples[0]["key"], samples[-1]["key"])

    for r in rows:
        key = r["key"]
        if prev is not None and not key > prev:
            raise ValueError(f"sample plan of {bucket_id} is not in strictly increasing key order at {key!r}")
        prev = key
        txt, meta = caption_txt(r["text"]), sample_meta(r, bucket_id)
        jpg_len = int(r["jpg_bytes"])
        size = sample_tar_bytes(jpg_len, len(txt), len(meta))
        if starts_new_shard(len(samples), acc, size, max_samples, max_bytes):
            yield done()
            index, samples, acc, h, known = index + 1, [], 0, None, True
        if h is None:
            h = start()
        sha = r.get("jpg_sha256")
        known = known and bool(sha)
        for part in (key.encode(), (sha or "").encode(), str(jpg_len).encode(), txt, meta):
            _field(h, part)
        samples.append({"key": key, "path": r["path"], "pack_offset": r["pack_offset"], "jpg_bytes": jpg_len,
                        "txt": txt, "json": meta})
        acc += size
    if samples:
        yield done()


def _sql_path(p: Path) -> str:
    # COPY TO takes a literal path; ours are generated under work_dir, never user text, but
    # quote them anyway.
    return str(p).replace("'", "''")
