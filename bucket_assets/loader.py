"""A training loader for a `bucketed_shards_v1` export: batches in which every image shares one
bucket (so a trainer can stack them), shard-level shuffling by seed, and splitting across
DataLoader workers and distributed ranks.

    from torch.utils.data import DataLoader
    from bucket_assets.loader import BucketBatches

    ds = BucketBatches("data/export", batch_size=8, seed=0, decode=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in DataLoader(ds, batch_size=None, num_workers=4):
            images = batch["image"]          # uint8 tensor [B, 3, H, W], one bucket per batch
            captions = batch["caption"]      # list of B strings

How samples are divided: the export's shards are shuffled by (seed, epoch) and dealt out
round-robin to the `world_size * num_workers` consumers, so every sample is read by exactly one
consumer per epoch (consumers can get different sample counts; a trainer that needs equal
step counts per rank should use `drop_last` or pad). Within a consumer, the next batch comes
from a bucket drawn with probability proportional to its remaining samples (the counts come
from the manifest), so batches of each bucket are spread over the epoch in proportion to the
bucket's size. Samples within a shard are shuffled in a buffer of `shuffle_buffer` samples.

Passthrough exports (`image_mode: passthrough_jpeg`) store each source JPEG unchanged, so with
`decode=True` every image is decoded, turned by its EXIF orientation, cover-resized and cropped
to its bucket's target here, by the exporter's own functions (core.imaging decode_rgb /
resize_cover / crop, core.buckets.plan_cover with the manifest's crop settings and the sample's
src_w/src_h/image_id): the same pixels a reencode export of the spec holds before its JPEG
encode. `decode=False` returns the stored bytes as they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from bucket_assets.core.buckets import Bucket, plan_cover
from bucket_assets.core.manifest import MANIFEST_NAME
from bucket_assets.core.shards import file_sha256, read_shard

try:  # torch is a dependency of the package; the loader also works without a DataLoader
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover
    IterableDataset = object  # type: ignore[misc,assignment]


class ChecksumError(ValueError):
    """A shard's bytes do not match the sha256 in the manifest."""


@dataclass(frozen=True)
class ShardRef:
    bucket_id: str
    path: str
    samples: int
    sha256: str
    width: int
    height: int


def _read_manifest(export_dir: str | os.PathLike) -> dict:
    return json.loads((Path(export_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))


def read_index(export_dir: str | os.PathLike, manifest: dict | None = None) -> list[ShardRef]:
    """Every shard of the export, in manifest order."""
    root = Path(export_dir)
    manifest = _read_manifest(root) if manifest is None else manifest
    out = []
    for bucket_id, b in manifest["buckets"].items():
        for sh in b["shards"]:
            out.append(ShardRef(bucket_id, str(root / sh["path"]), int(sh["samples"]), sh["sha256"],
                                int(b["scaled"]["w"]), int(b["scaled"]["h"])))
    return out


def assign_shards(shards: list[ShardRef], seed: int, epoch: int, consumer: int, consumers: int) -> list[ShardRef]:
    """This consumer's shards for the epoch: a seeded shuffle dealt out round-robin."""
    order = sorted(shards, key=lambda s: s.path)
    random.Random(_seed(seed, epoch, "shards")).shuffle(order)
    return order[consumer::consumers]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def _decode(jpg: bytes):
    import torch

    try:
        import simplejpeg

        arr = simplejpeg.decode_jpeg(jpg, colorspace="RGB")
    except Exception:  # noqa: BLE001 - not a baseline JPEG simplejpeg handles: Pillow does
        from PIL import Image

        arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


# The loader does not filter: an image in the export decodes whatever its pixel count.
_NO_PIXEL_LIMIT = 1 << 62


@dataclass(frozen=True)
class LoadTimeCover:
    """A passthrough export's reencode path, run at load time: the manifest's crop settings and
    DCT mode, and its buckets (as core.buckets.Bucket) by id."""

    buckets: dict[str, Bucket]
    strategy: str
    allowed_corners: tuple[int, ...]
    jitter: int
    dct_downscale: bool

    @classmethod
    def from_manifest(cls, manifest: dict) -> "LoadTimeCover":
        pre = manifest.get("preprocessing") or {}
        buckets = {
            bucket_id: Bucket(bucket_id, int(b["proto"]["w"]), int(b["proto"]["h"]), int(b["base_resolution"]),
                              int(b["scaled"]["w"]), int(b["scaled"]["h"]))
            for bucket_id, b in manifest["buckets"].items()
        }
        corners = tuple(int(c) for c in pre.get("allowed_corners", (2, 3)))
        return cls(buckets, pre.get("crop_strategy", "corner"), corners, int(pre.get("corner_jitter", 0)),
                   bool(pre.get("dct_downscale", False)))

    def render(self, jpg: bytes, meta: dict, bucket_id: str):
        """uint8 tensor [3, target_h, target_w]: decode (EXIF orientation applied), cover-resize
        (torch bicubic antialias, never upsampling) and crop exactly as processing.render does."""
        import torch

        from bucket_assets.core.imaging import crop, decode_rgb, resize_cover
        from bucket_assets.core.processing import DCT_MARGIN

        bucket = self.buckets[bucket_id]
        src_w, src_h, image_id = int(meta["src_w"]), int(meta["src_h"]), str(meta["image_id"])
        plan = plan_cover(src_w, src_h, bucket, image_id, self.strategy, self.allowed_corners, self.jitter)
        if plan is None:
            raise ValueError(f"{image_id}: {src_w}x{src_h} would need upsampling to fill {bucket_id} "
                             f"({bucket.w}x{bucket.h})")
        min_size = (DCT_MARGIN * plan.resized_w, DCT_MARGIN * plan.resized_h) if self.dct_downscale else None
        rgb = decode_rgb(jpg, _NO_PIXEL_LIMIT, None, min_size)
        h, w = rgb.shape[:2]
        factors = (1, 2, 4, 8) if self.dct_downscale else (1,)
        if not any((w, h) == (-(-src_w // f), -(-src_h // f)) for f in factors):
            raise ValueError(f"{image_id}: decoded {w}x{h}, but the sample was planned for {src_w}x{src_h}")
        rgb = resize_cover(rgb, plan.resized_w, plan.resized_h)
        rgb = crop(rgb, plan.crop_left, plan.crop_top, plan.target_w, plan.target_h)
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


class BucketBatches(IterableDataset):
    """Yields dicts: `bucket_id`, `key` (list), `caption` (list), `meta` (list of dicts) and
    `jpg` (list of bytes) or, with `decode=True`, `image` (uint8 tensor [B, 3, H, W]).

    On a passthrough export `jpg` holds the source files' bytes (any size, EXIF orientation not
    applied); `decode=True` resizes and crops each to its bucket's target at load time, the way
    the reencode path would have (module docstring).

    rank / world_size default to torch.distributed's when it is initialized, else 0 / 1.
    `verify=True` checks each shard's sha256 against the manifest before reading it.
    """

    def __init__(self, export_dir: str | os.PathLike, batch_size: int, seed: int = 0, *, decode: bool = False,
                 verify: bool = False, drop_last: bool = False, shuffle_buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.export_dir = str(export_dir)
        manifest = _read_manifest(export_dir)
        self.shards = read_index(export_dir, manifest)
        self.image_mode = manifest.get("image_mode", "reencode_jpeg")
        # Passthrough bytes are the source files: decode=True renders them to the bucket target.
        self._cover = LoadTimeCover.from_manifest(manifest) if self.image_mode == "passthrough_jpeg" else None
        self.batch_size = batch_size
        self.seed = seed
        self.decode = decode
        self.verify = verify
        self.drop_last = drop_last
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = _dist(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bucket_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for s in self.shards:
            sizes[s.bucket_id] = sizes.get(s.bucket_id, 0) + s.samples
        return sizes

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        consumer, consumers = self.rank * workers + worker, self.world_size * workers
        mine = assign_shards(self.shards, self.seed, self.epoch, consumer, consumers)
        rng = random.Random(_seed(self.seed, self.epoch, consumer))
        streams: dict[str, Iterator[tuple[str, dict[str, bytes]]]] = {}
        remaining: dict[str, int] = {}
        for s in mine:
            remaining[s.bucket_id] = remaining.get(s.bucket_id, 0) + s.samples
        for bucket_id in remaining:
            streams[bucket_id] = self._samples([s for s in mine if s.bucket_id == bucket_id], rng)
        buckets = sorted(remaining)
        while buckets:
            bucket_id = rng.choices(buckets, weights=[remaining[b] for b in buckets])[0]
            batch = []
            for key, parts in streams[bucket_id]:
                batch.append((key, parts))
                if len(batch) == self.batch_size:
                    break
            remaining[bucket_id] -= len(batch)
            if len(batch) < self.batch_size or remaining[bucket_id] <= 0:
                buckets.remove(bucket_id)
            if batch and (len(batch) == self.batch_size or not self.drop_last):
                yield self._collate(bucket_id, batch)

    def _samples(self, shards: list[ShardRef], rng: random.Random) -> Iterator[tuple[str, dict[str, bytes]]]:
        for shard in shards:
            if self.verify and file_sha256(shard.path) != shard.sha256:
                raise ChecksumError(f"{shard.path}: sha256 differs from the manifest")
            buf: list = []
            for sample in read_shard(shard.path):
                buf.append(sample)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
            rng.shuffle(buf)
            yield from buf

    def _collate(self, bucket_id: str, batch: list[tuple[str, dict[str, bytes]]]) -> dict:
        out = {
            "bucket_id": bucket_id,
            "key": [k for k, _ in batch],
            "caption": [p["txt"].decode("utf-8").removesuffix("\n") for _, p in batch],
            "meta": [json.loads(p["json"]) for _, p in batch],
        }
        if self.decode:
            import torch

            if self._cover is not None:
                images = [self._cover.render(p["jpg"], m, bucket_id) for (_, p), m in zip(batch, out["meta"])]
            else:
                images = [_decode(p["jpg"]) for _, p in batch]
            out["image"] = torch.stack(images)
        else:
            out["jpg"] = [p["jpg"] for _, p in batch]
        return out


def _dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return (dist.get_rank() if rank is None else rank), (dist.get_world_size() if world_size is None else world_size)
        except ImportError:  # pragma: no cover
            pass
    return rank or 0, world_size or 1


def _worker() -> tuple[int, int]:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover
        return 0, 1
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)
