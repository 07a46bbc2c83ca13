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
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from bucket_assets.core.atomic import atomic_write_text, atomic_writer
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.shards import Sample, ShardFile, sample_tar_bytes, shard_file_bytes, write_shard

STAGING = ".staging"
# The file that marks a directory as an export of ours: builds write only into an output_dir
# that is new, empty, or holds it (or a manifest of ours, from before the marker existed).
MARKER = ".bucket_assets_export"
BUCKET_DIR_RE = re.compile(r"^(r[0-9]+_)?p[0-9]+x[0-9]+$")
SHARD_FILE_RE = re.compile(r"^shard-[0-9]{6}\.tar$")
_MAX_MANIFEST = 256 << 20


class OutputDirError(ValueError):
    """The output_dir is not ours to write; the message says why and what to do."""


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest at `path` as a dict, or None when it is missing, not a regular file, too
    large, not JSON or not an object of our format (a corrupt manifest is replaced, not fatal)."""
    import json
    import stat

    from bucket_assets.core.manifest import FORMAT

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST:
            return None
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


def output_dir_problem(out_dir: str | os.PathLike) -> str | None:
    """Why a build must not write into `out_dir`, or None. Ours: missing, empty, marked, or
    holding a bucketed_shards_v1 manifest."""
    from bucket_assets.core.manifest import MANIFEST_NAME

    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        return f"output_dir {out} exists and is not a directory"
    if (out / MARKER).is_file():
        return None
    with os.scandir(out) as it:
        if next(it, None) is None:
            return None
    if read_manifest(out / MANIFEST_NAME) is not None:
        return None
    return (f"output_dir {out} is not empty and holds no bucket_assets export (no {MARKER}, no "
            f"bucketed_shards_v1 {MANIFEST_NAME}); a build would mix its files with yours: choose a new or empty directory")


def claim_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create the output dir if needed and mark it ours; OutputDirError if it is not ours.
    Writes nothing when the marker is already there."""
    problem = output_dir_problem(out_dir)
    if problem:
        raise OutputDirError(problem)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_text(out / MARKER, "This directory is a bucket_assets export (bucketed_shards_v1). "
                          "Builds remove and replace the files of the export here.\n")
    return out


def staging_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / STAGING


def _staged(out_dir: Path, rel: str, sha256: str) -> Path:
    return staging_dir(out_dir) / f"{rel}.{sha256}"


def stage_shard(out_dir: str | os.PathLike, rel: str,
                samples: Iterable[Sample] | Callable[[], Iterable[Sample]], size: int | None = None) -> ShardFile:
    """Write the shard published at `rel` (e.g. `buckets/<id>/shard-000000.tar`) to staging,
    unless the published file already holds exactly these bytes (then `rewritten` is False;
    with `samples` a callable nothing at all is written for an unchanged shard)."""
    out = Path(out_dir)
    target = staging_dir(out) / rel
    shard = write_shard(target, samples, same_as=out / rel, size=size)
    if target.parent.is_dir():
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

    size = shard_file_bytes(sum(sample_tar_bytes(int(s["jpg_bytes"]), len(s["txt"]), len(s["json"]))
                                for s in plan["samples"]))
    with StoreReader() as store:
        shard = stage_shard(plan["out_dir"], plan["rel"], lambda: (
            Sample(s["key"], store.read(s["path"], s["pack_offset"], s["jpg_bytes"]), s["txt"], s["json"])
            for s in plan["samples"]
        ), size)
    return {"samples": shard.samples, "bytes": shard.bytes, "sha256": shard.sha256, "rewritten": shard.rewritten}


def _our_shards(out: Path) -> Iterator[Path]:
    """Published files an export of ours writes: buckets/<bucket id>/shard-NNNNNN.tar."""
    buckets = out / "buckets"
    if not buckets.is_dir():
        return
    for d in sorted(buckets.iterdir()):
        if d.is_dir() and not d.is_symlink() and BUCKET_DIR_RE.match(d.name):
            for f in sorted(d.iterdir()):
                if SHARD_FILE_RE.match(f.name) and f.is_file() and not f.is_symlink():
                    yield f


def publish(out_dir: str | os.PathLike, shards: Iterable[tuple[str, str]], manifest_name: str,
            manifest_text: str | None) -> int:
    """Make (rel path, sha256) `shards` the published set and, unless `manifest_text` is None
    (manifest unchanged), replace the manifest. Returns how many staged shards were moved.
    Only shard files of our own naming in bucket directories of our naming are removed (and
    then their directories, once empty): a file the user put anywhere else is never touched."""
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
        dirs = set()
        for p in list(_our_shards(out)):
            if p not in keep:
                p.unlink()
                dirs.add(p.parent)
        for d in sorted(dirs):
            if not any(d.iterdir()):
                d.rmdir()
        if staging_dir(out).is_dir():
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
