"""The processed-image store: each planned sample rendered once to its final JPEG bytes.

Store layout: `<work_dir>/processed/<bucket_id>/pack-<pid>-<token>.bin`, append-only pack
files, one per worker process and bucket per run; a sample is (pack path, offset, bytes) in the
metadata DB with its fingerprint (source bytes, plan, image parameters, code version). Appending
to an open file instead of creating one file per image saves a file create and rename per image
(the largest cost left after the codec) and keeps millions of tiny files off the work disk.
A record becomes part of the store only once its row is journaled or committed, after its bytes
were written, so a half-written tail left by a kill is never read; packs no committed row
references are deleted, and packs mostly made of replaced records are compacted (the run's
lifecycle, in DuckDB and in bounded batches, is core/store.py).
A rebuild re-renders only samples whose fingerprint changed or whose record is gone, and
re-sharding after a caption change reads these bytes without decoding or encoding anything.

While a partition renders, each finished sample's row is also appended to the bucket's journal
(`<bucket_id>/.journal.jsonl`), so a run killed half way resumes from what is already stored
instead of rendering the whole bucket again. The journal is dropped once the rows are in the DB.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from bucket_assets.core.atomic import atomic_writer
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.journal import append_row, read_rows
from bucket_assets.core.imaging import (
    ImageError,
    crop,
    decode_rgb,
    encode_jpeg,
    grey_std,
    is_jpeg,
    jpeg_check,
    resize_cover,
    subsampling_for,
)
from bucket_assets.core.sources import read_bytes

RENDER_VERSION = 2  # bump when the pixels for the same inputs change (2: one orientation source)
# Approximate mode decodes at a DCT scale keeping at least this multiple of the resized size, so
# the exact torch resize still does a real antialiased downscale (PSNR vs exact: README).
DCT_MARGIN = 2


@dataclass(frozen=True)
class RenderParams:
    mode: str  # reencode_jpeg | passthrough_jpeg
    quality: int
    subsampling: str
    adaptive_threshold: float
    max_pixels: int
    blank_std: float | None = None  # drop images whose luma std is below this (None: keep all)
    dct_downscale: bool = False  # approximate mode: JPEG DCT-domain downscale before the resize


@dataclass(frozen=True)
class RenderTask:
    image_id: str
    bucket_id: str
    key: str
    source_sha256: str
    location: str
    member: str | None
    data_offset: int | None
    byte_size: int | None
    scale: float
    resized_w: int
    resized_h: int
    crop_left: int
    crop_top: int
    target_w: int
    target_h: int
    store_dir: str  # the bucket's directory in the store
    params: RenderParams
    orientation: int | None = None  # EXIF orientation from the raw index, if known
    # The size the plan was made from (raw index, after orientation): the decoded pixels must
    # have exactly this shape, or the sample is size_mismatch instead of a squashed image.
    src_w: int | None = None
    src_h: int | None = None
    # Which run this render belongs to. A long-lived worker (Celery) opens a new pack when it
    # changes, so it never appends to a pack an earlier run's pruning or compaction removed.
    store_token: str = ""

    def fingerprint(self) -> str:
        plan = [self.resized_w, self.resized_h, self.crop_left, self.crop_top, self.target_w, self.target_h]
        return hashlib.sha256(_fingerprint_text(self.source_sha256, plan, self.params).encode()).hexdigest()


def _fingerprint_text(src, plan: list, params: RenderParams) -> str:
    """What a fingerprint hashes: the inputs that decide a sample's bytes, as sorted-key JSON."""
    d = {
        "v": RENDER_VERSION,
        "src": src,
        "plan": plan,
        "params": [params.mode, params.quality, params.subsampling, params.adaptive_threshold,
                   params.blank_std] + ([True] if params.dct_downscale else []),
    }
    return json.dumps(d, sort_keys=True)


_PLAN_SLOT, _SRC_SLOT = "\x00plan", "\x00src"


def fingerprint_template(params: RenderParams) -> tuple[str, str, str]:
    """The fingerprint text of these parameters cut around its two per-sample parts, so SQL can
    build the same text (and so the same sha256) for every planned row: (text before the plan's
    six numbers, text between them and the source's JSON string, text after it). The numbers
    are joined by ", " and the source is a JSON string or null, as json.dumps writes them."""
    text = _fingerprint_text(_SRC_SLOT, [_PLAN_SLOT], params)
    head, plan, rest = text.partition(json.dumps(_PLAN_SLOT))
    mid, src, tail = rest.partition(json.dumps(_SRC_SLOT))
    if not (plan and src):  # the document's key order changed: SQL would hash another text
        raise AssertionError(f"fingerprint text {text!r} does not have the plan before the source")
    return head, mid, tail


# The store's rows in processed_images (core/shards.py's sample plan and the checks read them),
# one per planned sample: render() returns one, the journal holds them until they are committed.
PROCESSED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()), ("bucket_id", pa.string()), ("key", pa.string()), ("path", pa.string()),
        ("pack_offset", pa.int64()), ("fingerprint", pa.string()), ("status", pa.string()), ("error", pa.string()), ("bytes", pa.int64()),
        ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("subsampling", pa.int8()),
    ]
)

JOURNAL_NAME = ".journal.jsonl"
PACK_PREFIX = "pack-"
PACK_SUFFIX = ".bin"


def store_dir(processed_dir: str | os.PathLike, bucket_id: str) -> str:
    return str(Path(processed_dir) / bucket_id)


def prune_gone_buckets(processed_dir: str | os.PathLike, keep: set[str]) -> list[str]:
    """Remove the store directories of buckets the spec no longer has (their DB rows are
    dropped at the same time); returns the bucket ids removed."""
    import shutil

    from bucket_assets.core.publish import BUCKET_DIR_RE

    root = Path(processed_dir)
    if not root.is_dir():
        return []
    gone = sorted(d.name for d in root.iterdir()
                  if d.name not in keep and BUCKET_DIR_RE.match(d.name) and d.is_dir() and not d.is_symlink())
    for name in gone:
        shutil.rmtree(root / name)
    return gone


def journal_path(processed_dir: str | os.PathLike, bucket_id: str) -> Path:
    return Path(processed_dir) / bucket_id / JOURNAL_NAME


def is_pack(name: str) -> bool:
    return name.startswith(PACK_PREFIX) and name.endswith(PACK_SUFFIX)


class _Pack:
    def __init__(self, directory: str, token: str = ""):
        self.token = token
        os.makedirs(directory, exist_ok=True)
        self.path = new_pack_path(directory)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.size = 0

    def write(self, data: memoryview) -> None:
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
            self.size += n


# This process's open packs by bucket directory, with the run token they were opened for. A
# pack is never reopened once closed, and a new token closes it, so a pack pruned after an
# earlier run cannot be written to through a stale descriptor.
_PACKS: dict[str, _Pack] = {}


def append_to_store(directory: str, data: bytes, name: str, token: str = "") -> tuple[str, int]:
    """Append one record to this process's pack for the directory; returns (pack path, offset).
    The bytes are in the kernel when this returns (no fsync: a reused record is checked against
    its pack's size, so one lost to a power cut is rendered again)."""
    pack = _PACKS.get(directory)
    if pack is not None and pack.token != token:
        close_store_packs(directory)
        pack = None
    if pack is None:
        pack = _PACKS[directory] = _Pack(directory, token)
    offset = pack.size
    view = memoryview(data)
    try:
        half = len(data) // 2
        pack.write(view[:half])
        failpoint("write_half", name)  # crash tests: die with half a record written
        pack.write(view[half:])
    except BaseException:
        # The pack's tail is now a partial record no row points to; later records go to a new pack.
        close_store_packs(directory)
        raise
    return pack.path, offset


def close_store_packs(directory: str | None = None) -> None:
    """Close this process's open packs (all, or one directory's). Call when a run's rendering
    is done: the inline (1-worker) path renders in the orchestrating process."""
    for d in [directory] if directory is not None else list(_PACKS):
        pack = _PACKS.pop(d, None)
        if pack is not None:
            os.close(pack.fd)


def needs_compaction(live_bytes: int, pack_bytes: int, packs: int, max_packs: int = 256) -> bool:
    """A bucket's packs are compacted when replaced records fill more than half of them (its
    committed records hold `live_bytes` of the `pack_bytes` its `packs` packs take), or when
    incremental runs have left more than `max_packs` packs."""
    if live_bytes <= 0:
        return False  # nothing to keep: pruning removes every pack
    return packs > max_packs or pack_bytes > 2 * live_bytes


def new_pack_path(directory: str) -> str:
    return os.path.join(directory, f"{PACK_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}{PACK_SUFFIX}")


def compact(directory: str, rows: Iterable[dict]) -> Iterator[dict]:
    """Copy the live records of `rows` (one bucket, read in the order given, e.g. streamed from
    a query in key order) into one new pack; yields each row pointing into it (a row that is
    not `ok` as it is). The pack is written atomically: it appears under its name once the rows
    are exhausted, so consume them all before recording them. The old packs stay until pruned
    after the new rows are committed, so a kill here loses nothing."""
    offset = 0
    path = new_pack_path(directory)
    with StoreReader() as reader, atomic_writer(path, durable=False) as f:
        for r in rows:
            if r.get("status") != "ok":
                yield r
                continue
            f.write(reader.read(r["path"], r["pack_offset"], r["bytes"]))
            yield {**r, "path": path, "pack_offset": offset}
            offset += r["bytes"]


class StoreReader:
    """Reads records, keeping the packs it has opened open until closed."""

    def __init__(self) -> None:
        self._files: dict[str, object] = {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: record at {offset} is truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_journal(path: str | os.PathLike) -> dict[str, dict]:
    """key -> latest result row journaled for it (for inspection: the store loads journals into
    DuckDB in batches, core/store.py)."""
    return {row["key"]: row for row in read_rows(path) if isinstance(row.get("key"), str)}


class Journal:
    """Appends result rows to per-bucket journals. Not fsynced: it guards against a killed
    process (the kernel keeps what was written), and a reused row is checked against its file."""

    def __init__(self, processed_dir: str | os.PathLike):
        self.dir = Path(processed_dir)
        self.files: dict[str, object] = {}

    def append(self, row: dict) -> None:
        f = self.files.get(row["bucket_id"])
        if f is None:
            p = journal_path(self.dir, row["bucket_id"])
            p.parent.mkdir(parents=True, exist_ok=True)
            f = self.files[row["bucket_id"]] = open(p, "a", encoding="utf-8")
        append_row(f, row)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def render(task: RenderTask) -> dict:
    """Render one sample into the store. Returns a result row; never raises for bad images
    (a failing store write, such as a full disk, raises)."""
    failpoint("render")
    return _render(task, _no_clock)


def render_profiled(task: RenderTask) -> tuple[dict, dict[str, float]]:
    """render() plus seconds spent per step (read, decode, resize, crop, encode, write)."""
    times: dict[str, float] = {}
    last = [time.perf_counter()]

    def clock(step: str) -> None:
        now = time.perf_counter()
        times[step] = times.get(step, 0.0) + now - last[0]
        last[0] = now

    return _render(task, clock), times


def _no_clock(step: str) -> None:
    pass


def _size_mismatch(rgb, task: RenderTask, dct: bool) -> str | None:
    """Why the decoded pixels do not fit the plan, or None."""
    if task.src_w is None or task.src_h is None:
        return None
    h, w = rgb.shape[:2]
    factors = (1, 2, 4, 8) if dct else (1,)
    if any((w, h) == (-(-task.src_w // f), -(-task.src_h // f)) for f in factors):
        return None
    return f"decoded {w}x{h}, but the plan was made for {task.src_w}x{task.src_h}"


def _render(task: RenderTask, clock) -> dict:
    out = {
        "image_id": task.image_id,
        "bucket_id": task.bucket_id,
        "key": task.key,
        "path": None,
        "pack_offset": None,
        "fingerprint": task.fingerprint(),
        "status": "ok",
        "error": None,
        "bytes": None,
        "sha256": None,
        "width": None,
        "height": None,
        "subsampling": None,
    }
    try:
        data = read_bytes(task.location, task.member, task.data_offset, task.byte_size)
    except OSError as exc:
        out.update(status="read_error", error=str(exc))
        return out
    clock("read")
    p = task.params
    if p.mode == "passthrough_jpeg":
        if not is_jpeg(data):
            out.update(status="passthrough_not_jpeg", error="source is not a JPEG; passthrough keeps only JPEG bytes")
            return out
        jpg = data
        try:
            # Passthrough still proves the bytes decode, with the decoder verify and the
            # loaders use (Pillow), so nothing is published that they would reject.
            w, h, std = jpeg_check(data)
        except ValueError as exc:
            out.update(status="decode_error", error=str(exc))
            return out
        if p.blank_std is not None and std < p.blank_std:
            out.update(status="blank", error=f"luma std {std:.3f} < {p.blank_std}")
            return out
    else:
        try:
            min_size = (DCT_MARGIN * task.resized_w, DCT_MARGIN * task.resized_h) if p.dct_downscale else None
            rgb = decode_rgb(data, p.max_pixels, task.orientation, min_size)
        except ImageError as exc:
            out.update(status=exc.reason, error=exc.detail)
            return out
        clock("decode")
        mismatch = _size_mismatch(rgb, task, p.dct_downscale)
        if mismatch:
            out.update(status="size_mismatch", error=mismatch)
            return out
        rgb = resize_cover(rgb, task.resized_w, task.resized_h)
        clock("resize")
        rgb = crop(rgb, task.crop_left, task.crop_top, task.target_w, task.target_h)
        clock("crop")
        if p.blank_std is not None:
            std = grey_std(rgb)
            if std < p.blank_std:
                out.update(status="blank", error=f"luma std {std:.3f} < {p.blank_std}")
                return out
        sub = subsampling_for(p.subsampling, task.scale, p.adaptive_threshold)
        try:
            jpg = encode_jpeg(rgb, p.quality, sub)
        except Exception as exc:  # noqa: BLE001 - recorded per sample
            out.update(status="encode_error", error=f"{type(exc).__name__}: {exc}")
            return out
        clock("encode")
        h, w = rgb.shape[:2]
        out["subsampling"] = sub
    path, offset = append_to_store(task.store_dir, jpg, f"{task.key}.jpg", task.store_token)
    out.update(path=path, pack_offset=offset, bytes=len(jpg), sha256=hashlib.sha256(jpg).hexdigest(), width=w, height=h)
    clock("write")
    return out
