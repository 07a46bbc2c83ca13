"""The training loader on a real export: exactly once per epoch across workers and ranks,
batches never mix buckets, same seed same order, checksums; passthrough exports resized and
cropped at load time like the reencode path."""

from __future__ import annotations

import hashlib
import io
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


# Passthrough exports ----------------------------------------------------------------------------
# Four 3:4 photos of different sizes, all in one bucket (224x288 at base 256), one stored
# landscape with EXIF orientation 6 (so only the rotated pixels are 3:4).
PORTRAIT_SIZES = {"p240": (240, 320), "p300": (300, 400), "p360": (360, 480), "rot480": (480, 640)}


def write_portrait_folder(folder: Path) -> dict[str, bytes]:
    """The source folder (JPEGs + sidecar captions); returns image_id -> the JPEG's bytes."""
    from PIL import Image

    from bucket_assets.sample import load_photos

    photo = load_photos()["astronaut.png"]  # 512x512, smooth and detailed
    upright = photo.crop((64, 0, 448, 512))  # 384x512: 3:4
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, size in PORTRAIT_SIZES.items():
        img = upright.resize(size, Image.LANCZOS)
        buf = io.BytesIO()
        if stem.startswith("rot"):
            exif = Image.Exif()
            exif[0x0112] = 6  # viewers rotate it 90 degrees clockwise: back to upright
            img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
        else:
            img.save(buf, "JPEG", quality=95)
        (folder / f"{stem}.jpg").write_bytes(buf.getvalue())
        (folder / f"{stem}.txt").write_text(f"an astronaut, {size[0]}x{size[1]}\n")
        out[stem] = buf.getvalue()
    return out


def _portrait_export(sample_root: Path, out: Path, folder: Path, mode: str) -> Path:
    import yaml

    from bucket_assets_tests.conftest import spec_dict

    out.mkdir(parents=True)
    spec = out / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(sample_root, out, **{
        "sources": [{"name": "folder", "kind": "folder", "path": str(folder), "caption_variant": "sidecar"}],
        "buckets.base_resolutions": [256], "image.mode": mode,
    })))
    assert materialize_all(spec).success
    return Path(load_spec(spec).output_dir)


@pytest.fixture(scope="module")
def portraits(sample_root, tmp_path_factory) -> tuple[dict[str, bytes], Path, Path]:
    """(source bytes by image id, passthrough export, reencode export) of one spec."""
    root = tmp_path_factory.mktemp("portraits")
    sources = write_portrait_folder(root / "folder")
    exports = [_portrait_export(sample_root, root / mode, root / "folder", mode)
               for mode in ("passthrough_jpeg", "reencode_jpeg")]
    return sources, *exports


def _images_by_id(export: Path, **kw) -> dict[str, torch.Tensor]:
    out = {}
    for b in BucketBatches(export, batch_size=4, decode=True, **kw):
        out.update((m["image_id"], img) for m, img in zip(b["meta"], b["image"]))
    return out


def test_passthrough_decode_stacks_batches_of_the_bucket_target(portraits):
    from PIL import Image

    sources, passthrough, _ = portraits
    with Image.open(io.BytesIO(sources["rot480"])) as im:  # stored landscape, shown portrait
        assert im.size == (640, 480) and im.getexif()[0x0112] == 6
    assert json.loads((passthrough / "manifest.json").read_text())["image_mode"] == "passthrough_jpeg"
    (target_h, target_w), = {(s.height, s.width) for s in read_index(passthrough)}
    assert len({s.bucket_id for s in read_index(passthrough)}) == 1 and (target_w, target_h) == (224, 288)
    batches = list(BucketBatches(passthrough, batch_size=4, decode=True))
    assert [len(b["key"]) for b in batches] == [4]  # every source size, the rotated one included
    batch = batches[0]
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (4, 3, target_h, target_w)
    assert {m["image_id"] for m in batch["meta"]} == set(sources)
    # Several workers render the same pixels as the main process.
    in_workers = {m["image_id"]: img for b in DataLoader(BucketBatches(passthrough, batch_size=2, decode=True),
                                                          batch_size=None, num_workers=2)
                  for m, img in zip(b["meta"], b["image"])}
    assert in_workers.keys() == set(sources)
    for m, img in zip(batch["meta"], batch["image"]):
        assert torch.equal(in_workers[m["image_id"]], img)


def test_passthrough_decode_matches_the_reencode_export(portraits):
    from bucket_assets.core.buckets import cover_scale
    from bucket_assets.core.imaging import encode_jpeg, subsampling_for

    _, passthrough, reencode = portraits
    loaded, reference = _images_by_id(passthrough), _images_by_id(reencode)
    assert loaded.keys() == reference.keys() and len(loaded) == len(PORTRAIT_SIZES)
    for image_id, ref in reference.items():
        assert loaded[image_id].shape == ref.shape, image_id
        diff = (loaded[image_id].float() - ref.float()).abs()
        assert diff.mean() < 3, (image_id, float(diff.mean()))  # the reencode's JPEG error only
    # Exactly the reencode path's pixels: encoding them as it does gives the reencode export's bytes.
    pre = json.loads((reencode / "manifest.json").read_text())["preprocessing"]
    for b in BucketBatches(reencode, batch_size=4):
        for m, jpg in zip(b["meta"], b["jpg"]):
            scale = cover_scale(m["src_w"], m["src_h"], m["target_w"], m["target_h"])
            sub = subsampling_for(pre["jpeg_subsampling"], scale, pre["adaptive_threshold"])
            rgb = loaded[m["image_id"]].permute(1, 2, 0).numpy()
            assert encode_jpeg(rgb, pre["jpeg_quality"], sub) == jpg, m["image_id"]


def test_passthrough_without_decode_returns_the_source_bytes(portraits):
    sources, passthrough, _ = portraits
    jpgs = {m["image_id"]: jpg for b in BucketBatches(passthrough, batch_size=3) for m, jpg in zip(b["meta"], b["jpg"])}
    assert "image" not in next(iter(BucketBatches(passthrough, batch_size=3)))
    assert {k: hashlib.sha256(v).hexdigest() for k, v in jpgs.items()} == \
        {k: hashlib.sha256(v).hexdigest() for k, v in sources.items()}
