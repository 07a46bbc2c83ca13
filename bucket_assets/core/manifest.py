"""manifest.json of a bucketed_shards_v1 export: building it, and verifying an export against it."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bucket_assets.core.shards import MEMBER_EXTS, SAMPLE_JSON_KEYS, file_sha256, read_shard

FORMAT = "bucketed_shards_v1"
MANIFEST_NAME = "manifest.json"
# Fields that differ between two builds of the same inputs; everything else is reproducible.
VOLATILE_FIELDS = ("created",)


def export_id(spec_fingerprint: str, shard_sha256s: list[str]) -> str:
    """16 hex digits that change exactly when the spec or any shard's bytes change."""
    h = hashlib.sha256(spec_fingerprint.encode())
    for s in sorted(shard_sha256s):
        h.update(s.encode())
    return h.hexdigest()[:16]


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def same_content(a: dict, b: dict) -> bool:
    strip = lambda m: {k: v for k, v in m.items() if k not in VOLATILE_FIELDS}  # noqa: E731
    return strip(a) == strip(b)


class VerifyError(Exception):
    """The first problem found; names the shard (or the manifest)."""


@dataclass
class VerifyReport:
    buckets: int
    shards: int
    samples: int
    reverified: int = 0  # shards read and decoded this time (the rest matched `known`)
    verified: dict | None = None  # path -> [size, mtime_ns, inode, sha256] of every good shard


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _check_sample(
    shard: str, key: str, parts: dict[str, bytes], bucket_id: str, bucket: dict, mode: str, trusted: frozenset
) -> None:
    if sorted(parts) != sorted(MEMBER_EXTS):
        raise VerifyError(f"{shard}: sample {key} has members {sorted(parts)}, expected jpg/txt/json")
    if "." in key:
        raise VerifyError(f"{shard}: sample key {key!r} contains a dot")
    try:
        txt = parts["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise VerifyError(f"{shard}: {key}.txt is not UTF-8") from None
    if not txt.endswith("\n"):
        raise VerifyError(f"{shard}: {key}.txt is not newline-terminated")
    try:
        meta = json.loads(parts["json"])
    except json.JSONDecodeError:
        raise VerifyError(f"{shard}: {key}.json is not valid JSON") from None
    if not isinstance(meta, dict) or set(meta) != set(SAMPLE_JSON_KEYS):
        raise VerifyError(f"{shard}: {key}.json does not have the bucketed_shards_v1 keys")
    tw, th = bucket["scaled"]["w"], bucket["scaled"]["h"]
    if meta["bucket_id"] != bucket_id or (meta["target_w"], meta["target_h"]) != (tw, th):
        raise VerifyError(f"{shard}: {key}.json names bucket {meta['bucket_id']} {meta['target_w']}x{meta['target_h']}")
    if trusted and hashlib.sha256(parts["jpg"]).hexdigest() in trusted:
        return  # bytes already known to decode at this size
    try:
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            fmt = im.format
            im.load()
            size = im.size
    except Exception as exc:  # noqa: BLE001
        raise VerifyError(f"{shard}: {key}.jpg does not decode ({exc})") from None
    if fmt != "JPEG":
        raise VerifyError(f"{shard}: {key}.jpg is {fmt}, not JPEG")
    if mode == "reencode_jpeg" and size != (tw, th):
        raise VerifyError(f"{shard}: {key}.jpg is {size[0]}x{size[1]}, bucket target is {tw}x{th}")


def verify_export(
    export_dir: str | os.PathLike, known: dict | None = None, trusted_jpegs: frozenset = frozenset()
) -> VerifyReport:
    """Re-read every shard and check it against the manifest; raise VerifyError on the first fault.

    `known` (a previous report's `verified`) skips shards whose size, mtime, inode and manifest
    sha256 are unchanged since they were last fully verified; `trusted_jpegs` (sha256 hex of JPEG
    bytes known to decode at their bucket's size) skips decoding those members. The CLI passes
    neither: it re-reads and decodes everything.
    """
    known = known or {}
    verified: dict = {}
    reverified = 0
    root = Path(export_dir)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise VerifyError(f"{mpath}: manifest is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{mpath}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise VerifyError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT}")
    mode = manifest.get("image_mode")
    listed: set[Path] = set()
    n_shards = n_samples = 0
    for bucket_id, bucket in sorted(manifest["buckets"].items()):
        count = 0
        for sh in bucket["shards"]:
            rel = sh["path"]
            path = root / rel
            listed.add(path.resolve())
            if not path.is_file():
                raise VerifyError(f"{rel}: shard listed in the manifest is missing")
            stat = _stat_key(path)
            if known.get(rel) == stat + [sh["sha256"]] and stat[0] == sh["bytes"]:
                verified[rel] = known[rel]
                count += sh["samples"]
                n_shards += 1
                continue
            reverified += 1
            if path.stat().st_size != sh["bytes"]:
                raise VerifyError(f"{rel}: {path.stat().st_size} bytes, manifest says {sh['bytes']}")
            if file_sha256(path) != sh["sha256"]:
                raise VerifyError(f"{rel}: sha256 differs from the manifest")
            samples = 0
            keys = set()
            try:
                for key, parts in read_shard(path):
                    if key in keys:
                        raise VerifyError(f"{rel}: sample key {key} appears twice")
                    keys.add(key)
                    _check_sample(rel, key, parts, bucket_id, bucket, mode, trusted_jpegs)
                    samples += 1
            except VerifyError:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed tar
                raise VerifyError(f"{rel}: cannot read shard ({exc})") from None
            if samples != sh["samples"]:
                raise VerifyError(f"{rel}: {samples} samples, manifest says {sh['samples']}")
            count += samples
            n_shards += 1
            verified[rel] = stat + [sh["sha256"]]
        if count != bucket["count"]:
            raise VerifyError(f"buckets/{bucket_id}: {count} samples, manifest says {bucket['count']}")
        n_samples += count
    buckets_dir = root / "buckets"
    if buckets_dir.is_dir():
        for p in sorted(buckets_dir.rglob("*")):
            if p.is_file() and p.resolve() not in listed:
                raise VerifyError(f"{p.relative_to(root)}: file not listed in the manifest")
    total = manifest.get("summary", {}).get("samples_exported")
    if total is not None and total != n_samples:
        raise VerifyError(f"{mpath}: summary says {total} samples, shards hold {n_samples}")
    return VerifyReport(len(manifest["buckets"]), n_shards, n_samples, reverified, verified)


def build_manifest(
    *,
    spec,
    buckets: list,
    shards_by_bucket: dict[str, list[dict]],
    caption_sources: list[dict],
    selector_usage: dict[int, int],
    variant_counts: dict[str, int],
    summary: dict,
    created: str,
) -> dict:
    """The manifest dict; `buckets` are core.buckets.Bucket rows, only non-empty ones are listed."""
    img = spec.image
    bucket_entries = {}
    all_sha = []
    for b in sorted(buckets, key=lambda b: b.id):
        shards = shards_by_bucket.get(b.id) or []
        if not shards:
            continue
        all_sha += [s["sha256"] for s in shards]
        bucket_entries[b.id] = {
            "proto": {"w": b.proto_w, "h": b.proto_h},
            "scaled": {"w": b.w, "h": b.h},
            "base_resolution": b.base_resolution,
            "aspect": round(b.w / b.h, 4),
            "count": sum(s["samples"] for s in shards),
            "shards": shards,
        }
    selectors = []
    for i, variant in enumerate(spec.captions.selectors):
        newest = max((s for s in caption_sources if s["variant"] == variant), key=lambda s: s["created_at"], default=None)
        selectors.append(
            {
                "selector_index": i,
                "variant": variant,
                "backend": newest["backend"] if newest else None,
                "model": newest["model"] if newest else None,
                "planned_images": int(selector_usage.get(i, 0)),
            }
        )
    return {
        "format": FORMAT,
        "name": spec.name,
        "created": created,
        "export_id": export_id(spec.fingerprint(), all_sha),
        "image_mode": img.mode,
        "preprocessing": {
            "exif_transpose": True,
            "color": "RGB; alpha composited on white; 16-bit scaled to 8-bit; ICC converted to sRGB",
            "resize": "torch.nn.functional.interpolate(mode=bicubic, antialias=True, align_corners=False), CPU, uint8 channels-last",
            "cover_scale": "max(target_w / src_w, target_h / src_h)",
            "too_small_policy": "drop",
            "crop_strategy": img.crop.strategy,
            "allowed_corners": list(img.crop.allowed_corners),
            "corner_jitter": img.crop.jitter,
            "jpeg_quality": img.jpeg.quality,
            "jpeg_subsampling": img.jpeg.subsampling,
            "adaptive_threshold": img.jpeg.adaptive_threshold,
            "dct_downscale": img.dct_downscale,
        },
        "proto_base": 1024,
        "base_resolutions": list(spec.buckets.base_resolutions),
        "divisible": spec.buckets.divisible,
        "buckets": bucket_entries,
        "caption_sources": caption_sources,
        "caption_selectors": selectors,
        "caption_variants": dict(sorted(variant_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "missing_caption_policy": spec.captions.missing,
        "summary": summary,
        "spec_sha256": spec.fingerprint(),
    }
