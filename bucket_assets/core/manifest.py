"""manifest.json of a bucketed_shards_v1 export: building it, and verifying an export against it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Container, Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError

from bucket_assets.core.imaging import jpeg_decodes
from bucket_assets.core.shards import MEMBER_EXTS, SAMPLE_JSON_KEYS, read_shard

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
    """The first problem found; names the shard (or the manifest). Always one line: names taken
    from the manifest may hold newlines, so control characters are shown escaped."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def _one_line(s: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], s)


@dataclass
class VerifyReport:
    buckets: int
    shards: int
    samples: int
    reverified: int = 0  # shards read and decoded this time (the rest matched `known`)
    verified: dict | None = None  # path -> [size, mtime_ns, inode, sha256] of every good shard


# The part of manifest.json that verify relies on, checked in one pass before any shard is
# touched; other fields are the card's business and are ignored here.
_Count = Annotated[StrictInt, Field(ge=0)]
_Side = Annotated[StrictInt, Field(gt=0)]


class _ShardEntry(BaseModel):
    path: StrictStr
    samples: _Count
    bytes: _Count
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class _Size(BaseModel):
    w: _Side
    h: _Side


class _Bucket(BaseModel):
    scaled: _Size
    count: _Count
    shards: list[_ShardEntry]


class _Summary(BaseModel):
    samples_exported: _Count | None = None


class _Manifest(BaseModel):
    format: Literal[FORMAT]
    image_mode: Literal["reencode_jpeg", "passthrough_jpeg"]
    buckets: dict[str, _Bucket]
    summary: _Summary = _Summary()


_EXPECTED = {
    "model_type": "an object", "dict_type": "an object", "list_type": "a list", "int_type": "an integer",
    "string_type": "a string", "string_pattern_mismatch": "64 lowercase hex digits",
}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "top level"


def _kind(v) -> str:
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "a list"
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _schema_problem(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    e = errors[0]
    loc, t, ctx = tuple(e["loc"]), e["type"], e.get("ctx") or {}
    if t == "missing":
        msg = f"{_where(loc[:-1])} has no {loc[-1]}"
    else:
        if t == "literal_error":
            expected = ctx.get("expected", "")
        elif t == "greater_than_equal":
            expected = f">= {ctx.get('ge')}"
        elif t == "greater_than":
            expected = f"> {ctx.get('gt')}"
        else:
            expected = _EXPECTED.get(t, e["msg"].lower())
        msg = f"{_where(loc)} is {_kind(e.get('input'))}, expected {expected}"
    return msg + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path, st: os.stat_result, what: str):
    """Open a file already stat'ed as regular, without following a final symlink and without
    blocking (a FIFO swapped in since the stat would otherwise hang the open), and check that the
    open file is the one stat'ed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise VerifyError(f"{what}: cannot open ({exc.strerror})") from None
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise VerifyError(f"{what}: changed while being verified")
    return os.fdopen(fd, "rb")


def _read_manifest(mpath: Path) -> _Manifest:
    try:
        st = os.stat(mpath)  # a symlinked manifest is fine; its target must be a regular file
    except FileNotFoundError:
        raise VerifyError(f"{mpath}: manifest is missing") from None
    except OSError as exc:
        raise VerifyError(f"{mpath}: cannot stat the manifest ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise VerifyError(f"{mpath}: manifest is not a regular file ({_file_kind(st.st_mode)})")
    with _open_regular(Path(os.path.realpath(mpath)), st, str(mpath)) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VerifyError(f"{mpath}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise VerifyError(f"{mpath}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal over Python's digit limit
        raise VerifyError(f"{mpath}: not valid JSON ({exc})") from None
    try:
        return _Manifest.model_validate(data)
    except ValidationError as exc:
        raise VerifyError(f"{mpath}: {_schema_problem(exc)}") from None


def _shard_file(root: Path, buckets_real: Path, rel: str) -> tuple[Path, str, os.stat_result]:
    """(path, resolved path, lstat) of a listed shard: a regular file under <export>/buckets/,
    after resolving every symlink and `..` (the listed file itself may not be a symlink)."""
    path = root / rel
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise VerifyError(f"{rel}: not a usable path ({exc})") from None
    if not Path(real).is_relative_to(buckets_real) or Path(real) == buckets_real:
        raise VerifyError(f"{rel}: path outside the export (shards live under buckets/)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise VerifyError(f"{rel}: shard listed in the manifest is missing") from None
    except OSError as exc:
        raise VerifyError(f"{rel}: cannot stat ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise VerifyError(f"{rel}: listed shard is a symlink, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise VerifyError(f"{rel}: listed shard is not a regular file ({_file_kind(st.st_mode)})")
    return path, real, st


def _sha256_of(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


# The JPEG SOF markers that mean arithmetic coding (SOF9-11, SOF13-15).
def _check_sample(
    shard: str, key: str, parts: dict[str, bytes], bucket_id: str, target: tuple[int, int], mode: str,
    trusted: Container[str],
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
    except (ValueError, RecursionError):
        raise VerifyError(f"{shard}: {key}.json is not valid JSON") from None
    # Exports from before `source_meta` was added lack only that key; they still verify.
    if not isinstance(meta, dict) or set(meta) not in (set(SAMPLE_JSON_KEYS), set(SAMPLE_JSON_KEYS) - {"source_meta"}):
        raise VerifyError(f"{shard}: {key}.json does not have the bucketed_shards_v1 keys")
    tw, th = target
    if meta["bucket_id"] != bucket_id or (meta["target_w"], meta["target_h"]) != (tw, th):
        raise VerifyError(f"{shard}: {key}.json names bucket {meta['bucket_id']} {meta['target_w']}x{meta['target_h']}")
    if trusted and hashlib.sha256(parts["jpg"]).hexdigest() in trusted:
        return  # bytes already known to decode at this size
    try:
        size = jpeg_decodes(parts["jpg"])
    except ValueError as exc:
        raise VerifyError(f"{shard}: {key}.jpg does not decode ({exc})") from None
    if mode == "reencode_jpeg" and size != (tw, th):
        raise VerifyError(f"{shard}: {key}.jpg is {size[0]}x{size[1]}, bucket target is {tw}x{th}")


def verify_export(
    export_dir: str | os.PathLike, known: dict | None = None,
    trusted_jpegs: frozenset | Callable[[str, str], Container[str]] = frozenset(),
) -> VerifyReport:
    """Re-read every shard and check it against the manifest; raise VerifyError on the first fault.

    The manifest's structure is validated before any shard is opened, and every listed shard must
    be a regular file under <export_dir>/buckets/ once symlinks and `..` are resolved.
    `known` (a previous report's `verified`) skips shards whose size, mtime, inode and manifest
    sha256 are unchanged since they were last fully verified; `trusted_jpegs` (sha256 hex of JPEG
    bytes known to decode at their bucket's size, or a function of (bucket_id, shard path) giving
    them for the shard, called only for shards that are read, in manifest order) skips decoding
    those members. The CLI passes neither: it re-reads and decodes everything.
    """
    known = known if isinstance(known, dict) else {}
    verified: dict = {}
    reverified = 0
    root = Path(export_dir)
    mpath = root / MANIFEST_NAME
    manifest = _read_manifest(mpath)
    buckets_real = Path(os.path.realpath(root)) / "buckets"  # not resolved: a symlinked buckets/ is outside
    listed: set[str] = set()
    n_shards = n_samples = 0
    for bucket_id, bucket in sorted(manifest.buckets.items()):
        count = 0
        target = (bucket.scaled.w, bucket.scaled.h)
        for sh in bucket.shards:
            rel = sh.path
            path, real, st = _shard_file(root, buckets_real, rel)
            if real in listed:
                raise VerifyError(f"{rel}: listed twice in the manifest")
            listed.add(real)
            stat_key = [st.st_size, st.st_mtime_ns, st.st_ino]
            if known.get(rel) == stat_key + [sh.sha256] and st.st_size == sh.bytes:
                verified[rel] = known[rel]
                count += sh.samples
                n_shards += 1
                continue
            reverified += 1
            trusted = trusted_jpegs(bucket_id, rel) if callable(trusted_jpegs) else trusted_jpegs
            if st.st_size != sh.bytes:
                raise VerifyError(f"{rel}: {st.st_size} bytes, manifest says {sh.bytes}")
            with _open_regular(path, st, rel) as f:
                digest = _sha256_of(f)
            if digest != sh.sha256:
                raise VerifyError(f"{rel}: sha256 differs from the manifest")
            samples = 0
            keys = set()
            try:
                for key, parts in read_shard(path):
                    if key in keys:
                        raise VerifyError(f"{rel}: sample key {key} appears twice")
                    keys.add(key)
                    _check_sample(rel, key, parts, bucket_id, target, manifest.image_mode, trusted)
                    samples += 1
            except VerifyError:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed tar
                raise VerifyError(f"{rel}: cannot read shard ({exc})") from None
            if samples != sh.samples:
                raise VerifyError(f"{rel}: {samples} samples, manifest says {sh.samples}")
            count += samples
            n_shards += 1
            verified[rel] = stat_key + [sh.sha256]
        if count != bucket.count:
            raise VerifyError(f"buckets/{bucket_id}: {count} samples, manifest says {bucket.count}")
        n_samples += count
    buckets_dir = root / "buckets"
    if buckets_dir.is_dir():
        # Anything but a directory (a file, a symlink, a FIFO) must be a listed shard; symlinked
        # directories are not followed.
        extra = []
        for d, dirs, files in os.walk(buckets_dir):
            extra += [os.path.join(d, n) for n in dirs if os.path.islink(os.path.join(d, n))]
            extra += [os.path.join(d, n) for n in files]
        for p in sorted(extra):
            if os.path.islink(p) or os.path.realpath(p) not in listed:
                raise VerifyError(f"{Path(p).relative_to(root)}: file not listed in the manifest")
    total = manifest.summary.samples_exported
    if total is not None and total != n_samples:
        raise VerifyError(f"{mpath}: summary says {total} samples, shards hold {n_samples}")
    return VerifyReport(len(manifest.buckets), n_shards, n_samples, reverified, verified)


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
    rejected_caption_sources: list[dict] = (),
    warnings: list[str] = (),
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
        # Landing sources that could not be used, and what the build says out loud.
        "caption_sources_rejected": list(rejected_caption_sources),
        "warnings": list(warnings),
        "caption_variants": dict(sorted(variant_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "missing_caption_policy": spec.captions.missing,
        "summary": summary,
        "spec_sha256": spec.fingerprint(),
    }
