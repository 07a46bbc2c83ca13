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


def staged_path(out_dir: str | os.PathLike, rel: str, sha256: str) -> Path:
    """Where stage_shard left a rewritten shard until the manifest publish moves it to `rel`
    (a rename: the published file keeps this file's inode and mtime)."""
    return _staged(Path(out_dir), rel, sha256)


def stage_shard(out_dir: str | os.PathLike, rel: str,
                samples: Iterable[Sample] | Callable[[], Iterable[Sample]], size: int | None = None,
                known_different: bool = False) -> ShardFile:
    """Write the shard published at `rel` (e.g. `buckets/<id>/shard-000000.tar`) to staging,
    unless the published file already holds exactly these bytes (then `rewritten` is False;
    with `samples` a callable nothing at all is written for an unchanged shard).
    `known_different`: the published file is known to hold other content; it is not read."""
    out = Path(out_dir)
    target = staging_dir(out) / rel
    shard = write_shard(target, samples, same_as=out / rel, size=size, known_different=known_different)
    if target.parent.is_dir():
        for old in target.parent.glob(f"{target.name}.*"):
            old.unlink()  # an earlier staged version of this shard
    if shard.rewritten:
        os.replace(target, _staged(out, rel, shard.sha256))
    return shard


def file_identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of the regular file at `path` (a symlink is not followed), or None
    when there is none: what a build records of each shard file it leaves, to know next time
    whether that file is still the one it wrote."""
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None


UNCHANGED, DIFFERENT, UNKNOWN = "unchanged", "different", "unknown"


def shard_state(fingerprint: str | None, rel: str, size: int, recorded: dict | None,
                published: tuple[int, int, int] | None) -> str:
    """What a build must do for a planned shard (content `fingerprint`, file size `size`), given
    the shard_files row the last build recorded for its place (None: none) and the published
    file's identity (file_identity):

    UNCHANGED: the recorded fingerprint is this one and the published file is still the file
        recorded (same size, mtime_ns and inode): it holds these bytes; neither build nor read it.
    DIFFERENT: the published file is the one recorded, whose content had another fingerprint:
        build the shard and stage it without comparing it with the published file.
    UNKNOWN: anything else (no record, no fingerprint, the file missing, replaced or touched
        behind the build's back, a run killed before publishing): build it and compare.

    A file changed in place with its size and mtime restored looks UNCHANGED here; the full
    `bucket-assets verify` re-hashes every shard and names it."""
    if recorded is None or published is None or recorded.get("path") != rel:
        return UNKNOWN
    ident = (recorded.get("file_size"), recorded.get("mtime_ns"), recorded.get("inode"))
    if ident != published or recorded.get("bytes") != published[0]:
        return UNKNOWN
    if fingerprint is not None and recorded.get("fingerprint") == fingerprint and size == published[0]:
        return UNCHANGED
    return DIFFERENT if recorded.get("fingerprint") is not None and fingerprint is not None else UNKNOWN


def stage_planned_shard(plan: dict) -> dict:
    """stage_shard for one planned shard: {out_dir, rel, samples: [{key, path, pack_offset,
    jpg_bytes, txt, json}], known_different (optional, default False)} (txt and json as bytes),
    its JPEG bytes read from the processed-image store. Returns a plain dict."""
    from bucket_assets.core.processing import StoreReader

    size = shard_file_bytes(sum(sample_tar_bytes(int(s["jpg_bytes"]), len(s["txt"]), len(s["json"]))
                                for s in plan["samples"]))
    with StoreReader() as store:
        shard = stage_shard(plan["out_dir"], plan["rel"], lambda: (
            Sample(s["key"], store.read(s["path"], s["pack_offset"], s["jpg_bytes"]), s["txt"], s["json"])
            for s in plan["samples"]
        ), size, known_different=bool(plan.get("known_different")))
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
