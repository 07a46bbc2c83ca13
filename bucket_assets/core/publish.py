"""Publishing an export: shards are staged, and the manifest write moves them into place.

`bucket_shards` writes each changed shard to `<output_dir>/.staging/<rel>.<sha256>` instead
of over the published file. `export_manifest` then writes the new manifest to a temp file (the
last step that needs disk space), moves the staged shards into place (renames only), removes
published shards the new manifest no longer lists, and renames the manifest over the old one.

So a run that fails (full disk, bad input, a bug) before that point leaves the previous export
exactly as it was: its manifest and every shard it lists. A run killed during the renames
leaves some new shards under the old manifest; the rerun finds the rest still staged and
completes the move. The staging directory is hidden and gone after each publish.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from bucket_assets.core.atomic import atomic_writer
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.shards import Sample, ShardFile, write_shard

STAGING = ".staging"


def staging_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / STAGING


def _staged(out_dir: Path, rel: str, sha256: str) -> Path:
    return staging_dir(out_dir) / f"{rel}.{sha256}"


def stage_shard(out_dir: str | os.PathLike, rel: str, samples: Iterable[Sample]) -> ShardFile:
    """Write the shard published at `rel` (e.g. `buckets/<id>/shard-000000.tar`) to staging,
    unless the published file already holds exactly these bytes (then `rewritten` is False)."""
    out = Path(out_dir)
    target = staging_dir(out) / rel
    shard = write_shard(target, samples, same_as=out / rel)
    for old in target.parent.glob(f"{target.name}.*"):
        old.unlink()  # an earlier staged version of this shard
    if shard.rewritten:
        os.replace(target, _staged(out, rel, shard.sha256))
    return shard


def stage_planned_shard(plan: dict) -> dict:
    """stage_shard for one planned shard: {out_dir, rel, samples: [{key, path, pack_offset,
    jpg_bytes, txt, json}]} (txt and json as bytes), its JPEG bytes read from the processed-image
    store. Returns a plain dict."""
    from bucket_assets.core.processing import StoreReader

    with StoreReader() as store:
        shard = stage_shard(plan["out_dir"], plan["rel"], (
            Sample(s["key"], store.read(s["path"], s["pack_offset"], s["jpg_bytes"]), s["txt"], s["json"])
            for s in plan["samples"]
        ))
    return {"samples": shard.samples, "bytes": shard.bytes, "sha256": shard.sha256, "rewritten": shard.rewritten}


def publish(out_dir: str | os.PathLike, shards: Iterable[tuple[str, str]], manifest_name: str,
            manifest_text: str | None) -> int:
    """Make (rel path, sha256) `shards` the published set and, unless `manifest_text` is None
    (manifest unchanged), replace the manifest. Returns how many staged shards were moved."""
    out = Path(out_dir)
    listed = list(shards)
    moved = [0]

    def move() -> None:
        for rel, sha in listed:
            staged = _staged(out, rel, sha)
            if staged.is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, out / rel)
                moved[0] += 1
                failpoint("publish")
        keep = {out / rel for rel, _ in listed}
        buckets = out / "buckets"
        if buckets.is_dir():
            for p in sorted(buckets.rglob("*"), reverse=True):  # children before their dirs
                if p.is_dir():
                    if not any(p.iterdir()):
                        p.rmdir()
                elif p not in keep:
                    p.unlink()
        shutil.rmtree(staging_dir(out), ignore_errors=True)

    if manifest_text is None:
        move()
    else:
        data = manifest_text.encode("utf-8")
        with atomic_writer(out / manifest_name, before_replace=move) as f:
            f.write(data[: len(data) // 2])
            failpoint("write_half", manifest_name)  # crash tests: die with half a manifest written
            f.write(data[len(data) // 2 :])
    return moved[0]
