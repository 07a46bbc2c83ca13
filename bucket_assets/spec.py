"""The dataset spec: the YAML contract a user writes, as pydantic models.

`load_spec` parses and validates the shape (unknown keys, wrong types) and makes every path
absolute: a relative one is relative to the directory holding the spec file (as in docker
compose), not to the directory the command runs in; `~` is expanded. `check_paths` verifies that
the inputs exist; it runs before any work in `bucket-assets build` and in the first asset.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import annotated_types as at
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

DEFAULT_SPEC_PATH = "data/spec.yaml"
SPEC_ENV_VAR = "BUCKET_ASSETS_SPEC"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class SpecError(ValueError):
    """A spec that cannot be used; the message is one line naming the key."""


class _Model(BaseModel):
    # No NaN/inf anywhere: they pass or confuse every range check (NaN >= 0 is False, not an error).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _num(tp: type, lo: float, hi: float, *, lo_open: bool = False, note: str = ""):
    """An int or finite float in [lo, hi] ((lo, hi] with lo_open); every failure, wrong type
    included, says the bound. Integral floats (100.0) stay accepted for ints, as pydantic does."""
    kind = "an integer" if tp is int else "a finite number"
    span = f"greater than {lo} and at most {hi}" if lo_open else f"between {lo} and {hi}"
    msg = f"must be {kind} {span}{f' ({note})' if note else ''}"

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("out_of_bounds", msg) from None

    return Annotated[tp, at.Gt(lo) if lo_open else at.Ge(lo), at.Le(hi), WrapValidator(check)]


GiB = 1 << 30


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError("must match [A-Za-z0-9][A-Za-z0-9_-]*")
    return value


class WebDatasetSource(_Model):
    name: str
    kind: Literal["webdataset"]
    paths: list[str] = Field(min_length=1)
    caption_variant: str = "alt_text"
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp"]
    # img2dataset's per-shard <shard>.parquet beside <shard>.tar (every row of the shard, failed
    # downloads included): auto reads it where it exists, true also counts a tar without one
    # (source_files_skipped: missing_shard_parquet), false never reads it.
    read_shard_parquet: Literal["auto"] | StrictBool = "auto"

    _name = field_validator("name")(_check_name)


# Column names are only ever looked up in the parquet schema (never put into SQL), but an
# allow-list keeps quotes, control characters and odd lengths out of every message and query.
ColumnName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_ .:/-]{0,127}$")]


class _RecordColumns(_Model):
    """The columns every metadata table may map to a record's fields (parquet rows, imagefolder
    metadata rows)."""

    caption: ColumnName | None = "caption"
    fallback_caption: ColumnName | None = None
    width: ColumnName | None = None
    height: ColumnName | None = None
    url: ColumnName | None = None
    license: ColumnName | None = None


class ParquetColumns(_RecordColumns):
    # None: no id column; a record's id is then "<file stem>-<row index in the file>".
    id: ColumnName | None = "id"
    similarity: ColumnName | None = None  # CLIP similarity (min_similarity filters on it)
    nsfw: ColumnName | None = None  # NSFW tag (drop_nsfw filters on it)
    # The image bytes inside the parquet (Hugging Face `datasets` Image feature: a struct
    # {bytes, path}; or a plain binary column); then the source needs no image_dir.
    image: ColumnName | None = None


PathList = Annotated[list[str], Field(min_length=1)]


def source_paths(path: str | list[str]) -> list[str]:
    """A source `path` as a list of files or globs."""
    return [path] if isinstance(path, str) else list(path)


class ParquetSource(_Model):
    name: str
    kind: Literal["parquet"]
    path: str | PathList  # a file, a glob or a list of them (read in sorted order)
    image_dir: str | None = None  # <image_dir>/<id>.<ext>, unless columns.image holds the bytes
    columns: ParquetColumns = ParquetColumns()
    caption_variant: str = "caption"
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp"]

    _name = field_validator("name")(_check_name)

    @model_validator(mode="after")
    def _one_image_place(self):
        if self.image_dir is None and self.columns.image is None:
            raise ValueError("a parquet source needs image_dir (images in a folder, by id) or columns.image "
                             "(the image bytes in the parquet)")
        if self.image_dir is not None and self.columns.image is not None:
            raise ValueError("image_dir and columns.image both say where the images are: give one")
        if self.image_dir is not None and self.columns.id is None:
            raise ValueError("columns.id is needed with image_dir: a record's image is <image_dir>/<id>.<ext>")
        return self


class FolderColumns(_RecordColumns):
    """Columns of a folder's imagefolder metadata (`metadata.jsonl` / `metadata.csv`, rows keyed
    by `file_name`); a row without the column has no value from it."""

    caption: ColumnName | None = "text"


class FolderSource(_Model):
    name: str
    kind: Literal["folder"]
    path: str
    columns: FolderColumns = FolderColumns()  # of its metadata.jsonl / metadata.csv files, where present
    caption_variant: str = "sidecar"
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp"]

    _name = field_validator("name")(_check_name)


class UrlColumns(ParquetColumns):
    id: ColumnName = "id"  # required here: downloads are keyed by it
    url: ColumnName = "url"  # required here: it is where the image is

    @field_validator("image")
    @classmethod
    def _no_image(cls, v):
        if v is not None:
            raise ValueError("a urls source downloads its images; columns.image is for kind: parquet")
        return v


class Download(_Model):
    concurrency: _num(int, 1, 512) = 16
    per_host: _num(int, 1, 512) = 4
    timeout_s: _num(float, 0, 3600, lo_open=True) = 10.0
    retries: _num(int, 0, 20) = 3
    backoff_s: _num(float, 0, 600) = 0.5  # first retry's wait; doubles per retry
    max_backoff_s: _num(float, 0, 3600) = 30.0
    # The body is held in memory while it downloads.
    max_bytes: _num(int, 1, 4 * GiB, note="4 GiB") = 50_000_000
    max_redirects: _num(int, 0, 50) = 5
    user_agent: str = Field(default="bucket_assets/0.1 (dataset builder)", min_length=1, max_length=300)


class UrlSource(_Model):
    """Metadata parquet(s) with URLs (LAION-400M metadata, photo-concept-bucket): the images are
    downloaded into the work dir's content-addressed store by the `url_downloads` asset."""

    name: str
    kind: Literal["urls"]
    path: str | PathList  # a parquet file, a glob or a list of them (read in sorted order)
    columns: UrlColumns = UrlColumns()
    caption_variant: str = "alt_text"
    download: Download = Download()

    _name = field_validator("name")(_check_name)


Source = Annotated[Union[WebDatasetSource, ParquetSource, FolderSource, UrlSource], Field(discriminator="kind")]


class ColumnRule(_Model):
    """Keep a record only if its numeric `column` (a key of the source's own metadata: the tar
    .json, the parquet row, the imagefolder metadata) lies in [min, max]; a record without a
    numeric value there passes."""

    column: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    min: float | None = None
    max: float | None = None

    @field_validator("column")
    @classmethod
    def _printable(cls, v: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must not hold control characters")
        return v

    def model_post_init(self, _ctx) -> None:
        if self.min is None and self.max is None:
            raise ValueError(f"filters.columns rule for {self.column!r} needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"filters.columns rule for {self.column!r}: min {self.min} is above max {self.max}")


class Filters(_Model):
    # A CLIP cosine similarity; NaN would silently drop every record.
    min_similarity: _num(float, -1, 1) | None = 0.3
    drop_nsfw: list[str] = ["NSFW"]
    drop_blank: bool = True
    # Luma standard deviation (0-255) of the image below which it is blank (a uniform placeholder).
    blank_std_threshold: _num(float, 0, 255) = 2.0
    drop_duplicates: bool = True
    # Rules on any numeric column (aesthetic score, pwatermark, punsafe...), in order: the first
    # a record fails is its reason, `column_filter`.
    columns: list[ColumnRule] = []


class Buckets(_Model):
    base_resolutions: list[int] = Field(default=[512], min_length=1)
    divisible: _num(int, 1, 256) = 32

    @field_validator("base_resolutions")
    @classmethod
    def _bases(cls, v: list[int]) -> list[int]:
        if any(b < 64 or b > 4096 for b in v):
            raise ValueError("each base resolution must be between 64 and 4096")
        if len(set(v)) != len(v):
            raise ValueError("base resolutions must be distinct")
        return v

    @field_validator("divisible")
    @classmethod
    def _divisible_fits(cls, v: int, info: ValidationInfo) -> int:
        # scale_side clamps a side below divisible / 2 up to one multiple, so past the smallest
        # side the targets stop following their proto aspect (core/buckets.py).
        from bucket_assets.core.buckets import PROTO_BASE, PROTO_BUCKETS

        bases = info.data.get("base_resolutions")  # absent when it failed its own check
        if bases:
            base = min(bases)
            side = min(min(p) for p in PROTO_BUCKETS) * base // PROTO_BASE
            if v > side:
                raise ValueError(f"must be at most {side}, the smallest bucket side at base resolution {base}")
        return v


class Crop(_Model):
    strategy: Literal["corner", "center"] = "corner"
    allowed_corners: list[Literal[0, 1, 2, 3]] = Field(default=[2, 3], min_length=1)
    jitter: _num(int, 0, 4096) = 0


class Jpeg(_Model):
    quality: _num(int, 1, 100) = 95
    subsampling: Literal["adaptive_scale", "4:4:4", "4:2:2", "4:2:0"] = "adaptive_scale"
    adaptive_threshold: _num(float, 0, 1, lo_open=True) = 0.85


class ImageSpec(_Model):
    mode: Literal["reencode_jpeg", "passthrough_jpeg"] = "reencode_jpeg"
    crop: Crop = Crop()
    jpeg: Jpeg = Jpeg()
    # Images whose declared pixel count exceeds this are rejected as too_large before decoding.
    # 1 Gpx is ~3 GB decoded per worker.
    max_pixels: _num(int, 1, 1_000_000_000) = 100_000_000
    # Worker processes for decode/resize/encode; 0 means one per CPU core.
    workers: _num(int, 0, 1024) = 0
    # Approximate mode (opt-in): JPEGs decode at a 1/2, 1/4 or 1/8 DCT scale that is still at
    # least twice the resized size, then the same torch resize. Faster on large originals;
    # pixels differ slightly (PSNR in the README).
    dct_downscale: bool = False


class Captions(_Model):
    landing_dir: str = "data/captions"
    selectors: list[str] = Field(
        default=["caption_gemini_2_flash_lite", "caption_mistral_medium_3_1", "alt_text"], min_length=1
    )
    missing: Literal["empty", "drop"] = "empty"
    # Passed to DuckDB as a 32-bit INTEGER; past that the landing sources fail to load.
    max_chars: _num(int, 1, 10_000_000) = 20_000

    @field_validator("selectors")
    @classmethod
    def _unique_selectors(cls, selectors: list[str]) -> list[str]:
        if len(set(selectors)) != len(selectors):
            raise ValueError("lists a variant twice")
        return selectors


_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
# A 16MB DuckDB runs out of memory sorting 2M rows instead of spilling; 16TB is past any machine's RAM.
_MEMORY_MIN, _MEMORY_MAX = 64 * 10**6, 16 * 10**12


def size_bytes(v: str) -> float:
    """A validated size string (`3GB`, `256MiB`) in bytes."""
    m = _SIZE_RE.match(v)
    return float(m.group(1)) * _UNITS[m.group(2)]


class Metadata(_Model):
    # DuckDB working-memory cap for the metadata tables; bigger operations spill to work_dir.
    # Units as DuckDB reads them: KB = 1000 bytes, KiB = 1024.
    memory_limit: str = "3GB"
    # The cap for statements that only pass rows through in order (the scan fragments into
    # raw_index, the shard plan and its digests): they spill to disk instead of
    # caching what they pass, so the coordinator's memory does not follow the dataset. Capped
    # by memory_limit when that is lower.
    stream_memory_limit: str = "256MB"

    @field_validator("memory_limit", "stream_memory_limit")
    @classmethod
    def _memory(cls, v: str) -> str:
        m = _SIZE_RE.match(v)
        if not m or not _MEMORY_MIN <= float(m.group(1)) * _UNITS[m.group(2)] <= _MEMORY_MAX:
            raise ValueError("must be a size like 3GB (KB, MB, GB, TB, KiB, MiB, GiB, TiB) between 64MB and 16TB")
        return v

    def stream_limit(self) -> str:
        """stream_memory_limit, or memory_limit where that is lower."""
        return min(self.stream_memory_limit, self.memory_limit, key=size_bytes)


class Shards(_Model):
    max_samples: _num(int, 1, 1_000_000) = 1000
    max_bytes: _num(int, 10_000, 64 * GiB, note="64 GiB") = 1_000_000_000


class Spec(_Model):
    name: str
    output_dir: str
    work_dir: str
    sources: list[Source] = Field(min_length=1)
    filters: Filters = Filters()
    buckets: Buckets = Buckets()
    image: ImageSpec = ImageSpec()
    captions: Captions = Captions()
    shards: Shards = Shards()
    metadata: Metadata = Metadata()

    _name = field_validator("name")(_check_name)

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list) -> list:
        seen: set[str] = set()
        for s in sources:
            if s.name in seen:
                raise ValueError(f"two sources are named {s.name!r}")
            seen.add(s.name)
        return sources

    # Derived locations -----------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return Path(self.work_dir) / "metadata.duckdb"

    @property
    def processed_dir(self) -> Path:
        return Path(self.work_dir) / "processed"

    @property
    def downloads_dir(self) -> Path:
        return Path(self.work_dir) / "downloads"

    @property
    def multi_res(self) -> bool:
        return len(self.buckets.base_resolutions) > 1

    def fingerprint(self) -> str:
        """sha256 of the settings that decide the export's content; part of the export id.

        Where files live (output, work, source and landing paths) and how the build runs
        (worker count, DuckDB memory, download settings) are left out: the same inputs and settings give the same
        manifest wherever and however they are built. Input content is covered by the shards'
        sha256s and the caption sources listed in the manifest."""
        d = self.model_dump(mode="json", exclude={"output_dir", "work_dir", "metadata"})
        d["image"].pop("workers", None)
        d["captions"].pop("landing_dir", None)
        for s in d["sources"]:
            for k in ("path", "paths", "image_dir", "download"):
                s.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("webdataset", "parquet", "folder", "urls") and out.endswith("]"):
            continue  # discriminator tag pydantic inserts into the path
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def parse_spec(data: object, base_dir: str | os.PathLike | None = None) -> Spec:
    """Validate a spec mapping; relative paths resolve against base_dir (`load_spec` passes the
    spec file's directory; default: cwd, for a mapping that has no file)."""
    if not isinstance(data, dict):
        raise SpecError("spec error: the spec must be a YAML mapping")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        raise SpecError(f"spec error at {_loc(err['loc'])}: {msg}") from None
    return _resolve(spec, Path(base_dir if base_dir is not None else Path.cwd()).resolve())


def _abs(base: Path, p: str, *, pattern: bool = False) -> str:
    """`p` as an absolute path: `~` expanded, a relative path joined to `base`, then normalized
    lexically (as an absolute path written in the spec always was; links below `base` are not
    followed, so a relative path and its absolute spelling name the same thing). For a glob
    (`pattern`), the parts we add (base dir, home dir) are escaped so their `[`, `*`, `?` stay
    literal."""
    quote = glob.escape if pattern else (lambda x: x)
    if p.startswith("~"):
        head, sep, rest = p.partition("/")
        home = os.path.expanduser(head)
        if home != head:  # an unknown ~user stays as written, like os.path.expanduser
            p = quote(home) + sep + rest
    if not os.path.isabs(p):
        p = os.path.join(quote(str(base)), p)
    return os.path.normpath(p)


def _resolve(spec: Spec, base: Path) -> Spec:
    sources = []
    for s in spec.sources:
        if isinstance(s, WebDatasetSource):
            sources.append(s.model_copy(update={"paths": [_abs(base, p, pattern=True) for p in s.paths]}))
        elif isinstance(s, (UrlSource, ParquetSource)):
            path = [_abs(base, p, pattern=True) for p in source_paths(s.path)]
            update = {"path": path[0] if isinstance(s.path, str) else path}
            if isinstance(s, ParquetSource) and s.image_dir is not None:
                update["image_dir"] = _abs(base, s.image_dir)
            sources.append(s.model_copy(update=update))
        else:
            sources.append(s.model_copy(update={"path": _abs(base, s.path)}))
    captions = spec.captions.model_copy(update={"landing_dir": _abs(base, spec.captions.landing_dir)})
    return spec.model_copy(
        update={
            "output_dir": _abs(base, spec.output_dir),
            "work_dir": _abs(base, spec.work_dir),
            "sources": sources,
            "captions": captions,
        }
    )


def load_spec(path: str | os.PathLike | None = None) -> Spec:
    """Load the spec from `path`, else $BUCKET_ASSETS_SPEC, else data/spec.yaml (these three are
    relative to cwd); the spec's own relative paths are relative to the file's directory."""
    given = os.fspath(path or os.environ.get(SPEC_ENV_VAR) or DEFAULT_SPEC_PATH)
    path = Path(resolve_spec_path(given))
    shown = str(path) if str(path) == given else f"{path} (given as {given})"
    if not path.is_file():
        raise SpecError(f"spec error: spec file {shown} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec error: {shown} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec error: {shown} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_spec(data, path.parent)


def resolve_spec_path(path: str | os.PathLike | None = None) -> str:
    """The spec file's absolute path (links followed): relative to cwd, like any command-line path."""
    return str(Path(path or os.environ.get(SPEC_ENV_VAR) or DEFAULT_SPEC_PATH).resolve())


def _inside(child: str, parent: str) -> bool:
    c, p = Path(child).resolve(), Path(parent).resolve()
    return c == p or p in c.parents


_ESCAPED = re.compile(r"\[([*?[])\]")  # glob.escape's form of a literal *, ? or [


def _real_pattern(pattern: str) -> list[str]:
    """A glob's components, its literal prefix with symlinks resolved (and escaped again, so
    every component is a pattern)."""
    parts = Path(os.path.abspath(pattern)).parts
    literal: list[str] = []
    for part in parts:
        plain = _ESCAPED.sub(r"\1", part)
        if glob.escape(plain) != part:
            break  # the first component with real magic
        literal.append(plain)
    real = Path(os.path.realpath(os.path.join(*literal))).parts
    return [glob.escape(c) for c in real] + list(parts[len(literal):])


def _compatible(dir_parts: tuple[str, ...], pattern_parts: list[str]) -> bool:
    """Whether, component by component with fnmatch, one side can be a prefix of the other."""
    for d, p in zip(dir_parts, pattern_parts):
        if p == "**":
            return True  # reads as any depth (glob's recursive form): assume it can match anything below
        if not fnmatch.fnmatchcase(d, p):
            return False
    return True


def _pattern_overlaps(pattern: str, directory: str) -> bool:
    """Whether the files a glob (or an escaped plain path) can match and a dir overlap.

    Refused: a file under the dir could match (src/*/*/*.tar vs src/export), the pattern can match
    the dir or an ancestor, or the dir is inside a directory the pattern's files live in (the
    literal rule for plain paths). Together: the dir and the pattern's directory part are
    prefix-compatible."""
    return _compatible(Path(os.path.realpath(directory)).parts, _real_pattern(pattern)[:-1])


def _match_overlaps(match: str, directory: str) -> bool:
    """Whether a file a glob matches now, through its symlinks, is inside the dir, or the dir is
    inside that file's directory."""
    real = os.path.realpath(match)
    return _inside(real, directory) or _inside(directory, os.path.dirname(real))


def _check_is_dir(key: str, path: str) -> None:
    """The dir, or else its nearest existing ancestor, must be a directory (mkdir fails otherwise)."""
    p = path
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise SpecError(f"spec error at {key}: {p} is not a directory")


def check_paths(spec: Spec) -> None:
    """Fail with one line naming the key when an input is missing or an output overlaps an input."""
    outs = (("output_dir", spec.output_dir), ("work_dir", spec.work_dir))
    for key, out in outs:
        _check_is_dir(key, out)
    for i, s in enumerate(spec.sources):
        where = f"sources[{i}]"
        # (glob of the source's files, the path as written, its current matches); a directory d
        # is escape(d)/* with no matches listed (the folder reader walks it).
        inputs: list[tuple[str, str, list[str]]] = []
        if isinstance(s, WebDatasetSource):
            for j, pattern in enumerate(s.paths):
                inputs.append((pattern, pattern, glob.glob(pattern)))
                if not inputs[-1][2]:
                    raise SpecError(f"spec error at {where}.paths[{j}]: no file matches {pattern}")
        elif isinstance(s, (UrlSource, ParquetSource)):
            many = not isinstance(s.path, str)
            for j, pattern in enumerate(source_paths(s.path)):
                key = f"{where}.path[{j}]" if many else f"{where}.path"
                inputs.append((pattern, pattern, glob.glob(pattern)))
                if not inputs[-1][2]:
                    if isinstance(s, ParquetSource) and not glob.has_magic(pattern):
                        raise SpecError(f"spec error at {key}: file {pattern} does not exist")
                    raise SpecError(f"spec error at {key}: no file matches {pattern}")
            if isinstance(s, ParquetSource) and s.image_dir is not None:
                if not os.path.isdir(s.image_dir):
                    raise SpecError(f"spec error at {where}.image_dir: directory {s.image_dir} does not exist")
                inputs.append((os.path.join(glob.escape(s.image_dir), "*"), s.image_dir, []))
        else:
            if not os.path.isdir(s.path):
                raise SpecError(f"spec error at {where}.path: directory {s.path} does not exist")
            inputs.append((os.path.join(glob.escape(s.path), "*"), s.path, []))
        for pattern, shown, matches in inputs:
            for key, out in outs:
                if _pattern_overlaps(pattern, out):
                    raise SpecError(f"spec error at {key}: {out} overlaps the input {where} ({shown})")
                for m in matches:
                    if _match_overlaps(m, out):
                        raise SpecError(f"spec error at {key}: {out} overlaps the input {where} ({shown} matches {m})")
    if _inside(spec.output_dir, spec.work_dir) or _inside(spec.work_dir, spec.output_dir):
        raise SpecError("spec error at output_dir: output_dir and work_dir must not contain each other")
