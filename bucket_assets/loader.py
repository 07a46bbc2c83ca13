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


def read_index(export_dir: str | os.PathLike) -> list[ShardRef]:
    """Every shard of the export, in manifest order."""
    root = Path(export_dir)
    manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
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
    import numpy as np
    import torch

    try:
        import simplejpeg

        arr = simplejpeg.decode_jpeg(jpg, colorspace="RGB")
    except Exception:  # noqa: BLE001 - not a baseline JPEG simplejpeg handles: Pillow does
        from PIL import Image

        arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


class BucketBatches(IterableDataset):
    """Yields dicts: `bucket_id`, `key` (list), `caption` (list), `meta` (list of dicts) and
    `jpg` (list of bytes) or, with `decode=True`, `image` (uint8 tensor [B, 3, H, W]).

    rank / world_size default to torch.distributed's when it is initialized, else 0 / 1.
    `verify=True` checks each shard's sha256 against the manifest before reading it.
    """

    def __init__(self, export_dir: str | os.PathLike, batch_size: int, seed: int = 0, *, decode: bool = False,
                 verify: bool = False, drop_last: bool = False, shuffle_buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.export_dir = str(export_dir)
        self.shards = read_index(export_dir)
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

            out["image"] = torch.stack([_decode(p["jpg"]) for _, p in batch])
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
