"""The training loader on a real export: exactly once per epoch across workers and ranks,
batches never mix buckets, same seed same order, checksums."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from bucket_assets.core.shards import read_shard
from bucket_assets.loader import BucketBatches, ChecksumError, read_index
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all


@pytest.fixture(scope="module")
def export(sample_root, tmp_path_factory) -> Path:
    import yaml

    from bucket_assets_tests.conftest import spec_dict

    out = tmp_path_factory.mktemp("loader")
    spec = out / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(sample_root, out, **{"shards.max_samples": 3})))
    assert materialize_all(spec).success
    return Path(load_spec(spec).output_dir)


def _all_samples(export: Path) -> Counter:
    return Counter((s.bucket_id, key) for s in read_index(export) for key, _ in read_shard(s.path))


def _epoch(export: Path, world: int, workers: int, seed: int = 0, epoch: int = 0, **kw) -> list[dict]:
    batches = []
    for rank in range(world):
        ds = BucketBatches(export, batch_size=2, seed=seed, rank=rank, world_size=world, **kw)
        ds.set_epoch(epoch)
        batches += list(DataLoader(ds, batch_size=None, num_workers=workers))
    return batches


def test_every_sample_exactly_once_across_workers_and_ranks(export):
    expected = _all_samples(export)
    assert len(expected) > 20 and len({b for b, _ in expected}) > 3
    for world, workers in ((1, 0), (2, 2), (3, 1)):
        seen = Counter((b["bucket_id"], k) for b in _epoch(export, world, workers) for k in b["key"])
        assert seen == expected, (world, workers)


def test_batches_never_mix_buckets_and_decode_to_the_bucket_size(export):
    sizes = {s.bucket_id: (s.height, s.width) for s in read_index(export)}
    batches = _epoch(export, 1, 2, decode=True)
    assert any(len(b["key"]) == 2 for b in batches)
    for b in batches:
        assert {m["bucket_id"] for m in b["meta"]} == {b["bucket_id"]}
        h, w = sizes[b["bucket_id"]]
        assert b["image"].dtype == torch.uint8 and tuple(b["image"].shape) == (len(b["key"]), 3, h, w)
        assert len(b["caption"]) == len(b["key"]) and all(isinstance(c, str) for c in b["caption"])


def test_same_seed_same_order_and_epochs_reshuffle(export):
    order = lambda bs: [k for b in bs for k in b["key"]]  # noqa: E731
    a, b = order(_epoch(export, 2, 2, seed=7)), order(_epoch(export, 2, 2, seed=7))
    assert a == b
    assert order(_epoch(export, 2, 2, seed=7, epoch=1)) != a
    assert order(_epoch(export, 2, 2, seed=8)) != a
    assert sorted(order(_epoch(export, 2, 2, seed=8))) == sorted(a)


def test_drop_last_yields_only_full_batches(export):
    batches = _epoch(export, 2, 0, drop_last=True)
    assert batches and all(len(b["key"]) == 2 for b in batches)


def test_verify_rejects_a_corrupt_shard(export, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    assert list(BucketBatches(copy, batch_size=4, verify=True))
    shard = Path(read_index(copy)[0].path)
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=shard.name):
        list(BucketBatches(copy, batch_size=4, verify=True))


def test_export_reads_in_hugging_face_datasets(export, tmp_path, monkeypatch):
    """`load_dataset("webdataset", ...)` infers one schema for the whole export: every json field
    has the same type in every sample."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files = sorted(str(p) for p in export.rglob("shard-*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    expected = _all_samples(export)
    assert len(ds) == sum(expected.values())
    assert {"jpg", "txt", "json"} <= set(ds.column_names)
    fields = ds.features["json"]
    assert set(fields) >= {"image_id", "bucket_id", "similarity", "target_w", "target_h", "caption_source_id"}
    row = ds[0]
    assert row["jpg"].size == (row["json"]["target_w"], row["json"]["target_h"])
    in_shards = Counter((s.bucket_id, json.loads(p["json"])["image_id"]) for s in read_index(export)
                        for _, p in read_shard(s.path))
    assert Counter((r["bucket_id"], r["image_id"]) for r in ds["json"]) == in_shards
