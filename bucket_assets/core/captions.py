"""Captions: text cleaning, caption-source files in the landing directory, and the waterfall.

The waterfall runs as SQL over a DuckDB connection (no Dagster here), so the same code serves
a unit test on an in-memory database and a build over millions of rows.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

REQUIRED_META = ("variant", "backend", "model", "created_at", "system_prompt_sha256", "user_prompt_sha256")
_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


# Whitespace trimmed from captions: every character Python's str.isspace() accepts, so the
# Python path (source captions) and the SQL path (landing captions) trim exactly alike.
_WS = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


class CaptionSourceError(ValueError):
    """A landing caption source that cannot be used; the message says why. `variant`: the
    variant its metadata names, when that much could be read."""

    def __init__(self, message: str, variant: str | None = None):
        super().__init__(message)
        self.variant = variant


class VariantNotSelected(CaptionSourceError):
    """A good pair whose variant no selector names: the spec, not the files, decides it is unused."""


def clean_caption(raw: bytes | str | None, max_chars: int) -> tuple[str | None, list[str]]:
    """Normalise one caption: UTF-8 with replacement, no NULs, trimmed, capped. Returns flags."""
    flags: list[str] = []
    if raw is None:
        return None, flags
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            flags.append("caption_not_utf8")
    else:
        text = raw
    if "\x00" in text:
        text = text.replace("\x00", "")
        flags.append("caption_nul_removed")
    text = text.strip(_WS)
    if len(text) > max_chars:
        text = text[:max_chars].rstrip(_WS)
        flags.append("caption_truncated")
    return text, flags


def as_float(value: object) -> tuple[float | None, bool]:
    """A similarity-like number, or (None, invalid?) for strings, NaN, infinities and junk."""
    if value is None:
        return None, False
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None, True
    if math.isnan(f) or math.isinf(f) or isinstance(value, bool):
        return None, True
    return f, False


@dataclass(frozen=True)
class LandingSource:
    name: str
    variant: str
    backend: str
    model: str
    created_at: int
    system_prompt_sha256: str
    user_prompt_sha256: str
    parquet_path: str
    fingerprint: str  # landing_fingerprint of the parquet + json pair


# Landing files ---------------------------------------------------------------------------
#
# Everything below turns any landing file into a LandingSource or one CaptionSourceError line:
# files are opened only when they are regular files, the json is parsed with every parser
# failure caught, and the parquet is read from exactly the named file (never a glob).

MAX_CREATED_AT = 253402300799  # 9999-12-31T23:59:59Z; caption_sources stores int64 seconds
_META_MAX_BYTES = 1 << 20  # a source's json is a few hundred bytes
_ID_TYPES = ("VARCHAR", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UBIGINT", "UINTEGER", "USMALLINT", "UTINYINT", "HUGEINT")
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def printable(text: str) -> str:
    """`text` fit for a one-line reason, a log line or a UTF-8 table: non-printable characters
    (newlines, lone surrogates from undecodable file names) become their escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _who(name: str) -> str:
    return f"caption source {printable(name)}"


def _why(exc: BaseException, limit: int = 300) -> str:
    """An error's message as one short line (DuckDB adds `LINE 1: ...` and a caret below it;
    a Python error inside an Arrow scan arrives with its traceback appended)."""
    text = str(exc).split(". Detail: Python exception")[0]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    line = printable(line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _value(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _fname(path: str | os.PathLike) -> str:
    return printable(os.path.basename(os.fspath(path)))


def _stat_regular(path: str | os.PathLike, who: str) -> os.stat_result:
    """stat of a regular file, else CaptionSourceError naming what it is; never opens it.

    A symlink to a regular file is that file (sources may be linked in from other storage);
    a dangling symlink, a loop, or a link to anything else is rejected."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CaptionSourceError(f"{who}: {_fname(path)} is a dangling symlink") from None
        raise CaptionSourceError(f"{who}: {_fname(path)} has disappeared") from None
    except OSError as exc:
        raise CaptionSourceError(f"{who}: cannot stat {_fname(path)} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _NOT_REGULAR if test(st.st_mode)), "not a file")
        raise CaptionSourceError(f"{who}: {_fname(path)} is {kind}, not a regular file")
    return st


def landing_file_stat(name: str, path: str | os.PathLike) -> os.stat_result:
    """os.stat of one file of landing source `name`; CaptionSourceError unless it is a regular file."""
    return _stat_regular(path, _who(name))


def _open_regular(path: str | os.PathLike, who: str):
    """A binary file object, only for a regular file. Checked before opening (so a FIFO or a
    device is never opened) and again on the open descriptor; O_NONBLOCK so a FIFO swapped in
    between cannot block."""
    _stat_regular(path, who)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise CaptionSourceError(f"{who}: cannot open {_fname(path)} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CaptionSourceError(f"{who}: {_fname(path)} is not a regular file")
    return os.fdopen(fd, "rb")


def file_sha256(path: str | os.PathLike, who: str = "caption source file") -> str:
    """sha256 of a regular file; CaptionSourceError (never a hang) for anything else."""
    h = hashlib.sha256()
    with _open_regular(path, who) as f:
        try:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        except OSError as exc:
            raise CaptionSourceError(f"{who}: cannot read {_fname(path)} ({exc.strerror or exc})") from None
    return h.hexdigest()


def discover_landing(landing_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """Complete (name, parquet, json) pairs by name; a parquet without its json is not yet complete.

    Entries of any kind pair up (a directory, FIFO or dangling symlink called `<name>.json`
    too), so validation gives a bad one its reason. Only the directory is listed: no entry is
    opened or stat'ed here. No landing_dir means no sources; one that exists but cannot be
    listed is a CaptionSourceError (not "no sources", which would drop every landed caption)."""
    d = Path(landing_dir)
    try:
        with os.scandir(d) as it:
            names = {e.name for e in it}
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CaptionSourceError(f"captions.landing_dir {printable(str(d))} cannot be listed ({exc.strerror or exc})") from None
    stems = sorted(n[: -len(".json")] for n in names if n.endswith(".json") and len(n) > len(".json"))
    return [(s, d / f"{s}.parquet", d / f"{s}.json") for s in stems if f"{s}.parquet" in names]


def _check_name(name: str) -> None:
    # The name is stored, logged and put in run tags: it must be text.
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise CaptionSourceError(f"{_who(name)}: its file name is not valid UTF-8 text (undecodable bytes or control characters)")


def _parse_meta(who: str, meta_path: Path) -> tuple[object, bytes]:
    """The json's value and its bytes. Any parser failure is a reason: bad syntax, bad UTF-8,
    nesting past the recursion limit (RecursionError), an integer over Python's digit limit
    (ValueError)."""
    with _open_regular(meta_path, who) as f:
        try:
            data = f.read(_META_MAX_BYTES + 1)
        except OSError as exc:
            raise CaptionSourceError(f"{who}: cannot read {_fname(meta_path)} ({exc.strerror or exc})") from None
    if len(data) > _META_MAX_BYTES:
        raise CaptionSourceError(f"{who}: {_fname(meta_path)} is larger than {_META_MAX_BYTES >> 20} MiB")
    try:
        return json.loads(data.decode("utf-8")), data
    except RecursionError:
        why = "nested too deeply"
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = _why(exc)
    raise CaptionSourceError(f"{who}: {_fname(meta_path)} is not valid JSON ({why})")


def read_landing_meta(name: str, parquet: Path, meta_path: Path) -> LandingSource:
    """A landing pair's json checked into a LandingSource; CaptionSourceError (one line) says why not.

    Both files must be regular files (see _stat_regular: symlinks to regular files are fine).
    created_at is finite unix seconds in [0, MAX_CREATED_AT]. A string field holding a lone
    surrogate (`"\\ud800"`) is rejected, not repaired: these fields are provenance, and a
    silently altered model name or prompt hash would misstate it."""
    who = _who(name)
    _check_name(name)
    _stat_regular(parquet, who)
    meta, data = _parse_meta(who, meta_path)
    if not isinstance(meta, dict):
        raise CaptionSourceError(f"{who}: {_fname(meta_path)} must hold a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CaptionSourceError(f"{who}: {_fname(meta_path)} is missing {', '.join(missing)}")
    variant = meta["variant"]
    if not isinstance(variant, str) or not _VARIANT_RE.fullmatch(variant):
        raise CaptionSourceError(f"{who}: variant {_value(variant)} is not a valid variant name")
    created = meta["created_at"]
    # NaN fails both comparisons; json.loads turns 1e400 into inf.
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not 0 <= created <= MAX_CREATED_AT:
        raise CaptionSourceError(
            f"{who}: created_at must be unix seconds from 0 to {MAX_CREATED_AT} (year 9999), got {_value(created)}"
        )
    for k in ("backend", "model", "system_prompt_sha256", "user_prompt_sha256"):
        if not isinstance(meta[k], str):
            raise CaptionSourceError(f"{who}: {k} must be a string")
        try:
            meta[k].encode("utf-8")
        except UnicodeEncodeError:
            raise CaptionSourceError(f"{who}: {k} {_value(meta[k])} holds a lone surrogate, so it is not text (rejected, not repaired)") from None
    parquet_sha = file_sha256(parquet, who)
    return LandingSource(
        name=name,
        variant=variant,
        backend=meta["backend"],
        model=meta["model"],
        created_at=int(created),
        system_prompt_sha256=meta["system_prompt_sha256"],
        user_prompt_sha256=meta["user_prompt_sha256"],
        parquet_path=str(parquet),
        # = landing_fingerprint, over the json bytes that were validated
        fingerprint=_pair_fingerprint(parquet_sha, hashlib.sha256(data).hexdigest()),
    )


_GLOB_CHARS = re.compile(r"[*?\[\]{}]")
_SCAN_LINKS: dict[str, str] = {}


def scan_path(src: LandingSource) -> str:
    """A path DuckDB's read_parquet reads as exactly this source's file: read_parquet expands
    glob characters (`gem*`, `v[1]`, `a?`) and would read other files, so a name holding any
    is reached through a symlink with a plain name in a private temp dir. Bind it as $path."""
    path = src.parquet_path
    if not _GLOB_CHARS.search(path):
        return path
    link = _SCAN_LINKS.get(path)
    if link is None or not os.path.islink(link):
        import atexit
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix="bucket_assets-landing-")
        atexit.register(shutil.rmtree, d, True)
        link = os.path.join(d, "source.parquet")
        os.symlink(os.path.abspath(path), link)
        _SCAN_LINKS[path] = link
    return link


def _landing_schema(src: LandingSource) -> pa.Schema:
    """The parquet's schema, read through _open_regular (never a FIFO or device), with the
    column checks DuckDB would not make (a duplicated name is silently renamed there)."""
    import pyarrow.parquet as pq

    who = _who(src.name)
    with _open_regular(src.parquet_path, who) as f:
        try:
            schema = pq.ParquetFile(f).schema_arrow
        except Exception as exc:  # noqa: BLE001 - not a parquet, 0 bytes, truncated, unsupported
            raise CaptionSourceError(f"{who}: cannot read parquet {_fname(src.parquet_path)} ({_why(exc)})") from None
    for col in ("image_id", "caption"):
        if col not in schema.names:
            raise CaptionSourceError(f"{who}: missing column {col!r}")
    for col in ("image_id", "caption", "status"):
        if schema.names.count(col) > 1:
            raise CaptionSourceError(f"{who}: {schema.names.count(col)} columns are named {col!r}")
    return schema


def landing_query(con, src: LandingSource, sql: str, params: dict | None = None, fetch=lambda r: r.fetchall()):
    """Run `sql` (over landing_captions_sql) and fetch; any failure reading the file, however
    DuckDB reports it, is a one-line CaptionSourceError."""
    try:
        return fetch(con.execute(sql, params) if params else con.execute(sql))
    except CaptionSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - DuckDB raises several types; a scan's own reason arrives as text
        text, own = str(exc), f"{_who(src.name)}: "
        if own in text:  # a CaptionSourceError raised inside the scan
            raise CaptionSourceError(own + _why(text[text.index(own) + len(own):])) from None
        if "UTF8" in text:
            raise CaptionSourceError(f"{own}a string column holds text that is not valid UTF-8 ({_why(exc)})") from None
        raise CaptionSourceError(f"{own}cannot read captions ({_why(exc)})") from None


def _landing_table(con, src: LandingSource, columns: list[str]) -> str:
    import pyarrow.parquet as pq

    with _open_regular(src.parquet_path, _who(src.name)) as f:
        try:
            table = pq.read_table(f, columns=columns)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise CaptionSourceError(f"{_who(src.name)}: cannot read parquet {_fname(src.parquet_path)} ({_why(exc)})") from None
    table = table.append_column("file_row_number", pa.array(range(table.num_rows), pa.int64()))
    view = "_landing_" + hashlib.sha256(os.fsencode(src.parquet_path)).hexdigest()[:16]
    con.register(view, table)
    return view


def landing_captions_sql(con, src: LandingSource) -> str:
    """SQL selecting (image_id, text, status, row_number, flags) from one landing parquet, cleaned like
    clean_caption (NULs removed, trimmed, capped at $max_chars, flagged). Parameters: $path,
    $max_chars. Raises CaptionSourceError for missing or mistyped columns and non-UTF-8 text.

    Bind $path to scan_path(src): read_parquet globs, so a name with glob characters is read
    through a plain-named link to exactly its file. Only a status of exactly 'ok' counts; a NULL status is
    stored as 'no_status'; a source without a status column is all 'ok'."""
    names = _landing_schema(src).names
    wanted = ["image_id", "caption"] + (["status"] if "status" in names else [])
    if "file_row_number" in names:
        # DuckDB cannot add its row number beside a column of that name: this rare file is read
        # with pyarrow (its three columns) and registered as a table, numbered in file order.
        scan = f"(SELECT * FROM {_landing_table(con, src, wanted)} WHERE $path IS NOT NULL)"  # callers bind $path
    else:
        scan = f"(SELECT {', '.join(wanted)}, file_row_number FROM read_parquet($path, file_row_number = true))"
    cols = dict((r[0], r[1]) for r in landing_query(con, src, f"DESCRIBE SELECT * FROM {scan}", {"path": scan_path(src)}))
    if cols["image_id"] not in _ID_TYPES:
        raise CaptionSourceError(f"{_who(src.name)}: column 'image_id' must be string or integer, got {cols['image_id']}")
    if cols["caption"] == "BLOB":
        bad = landing_query(
            con, src,
            f"""SELECT image_id FROM {scan}
               WHERE caption IS NOT NULL AND try(decode(caption)) IS NULL LIMIT 1""",
            {"path": scan_path(src)}, fetch=lambda r: r.fetchone(),
        )
        if bad:
            raise CaptionSourceError(f"{_who(src.name)}: the caption of image_id {printable(str(bad[0]))} is not valid UTF-8")
        raw = "decode(caption)"
    elif cols["caption"] == "VARCHAR":
        raw = "caption"
    else:
        raise CaptionSourceError(f"{_who(src.name)}: column 'caption' must be string, got {printable(cols['caption'])}")
    status = "coalesce(CAST(status AS VARCHAR), 'no_status')" if "status" in cols else "'ok'"
    ws = _WS.replace("'", "''")
    return f"""
        SELECT image_id, rtrim(left(t, $max_chars), '{ws}') AS text, status, row_number,
               nullif(concat_ws(',', CASE WHEN has_nul THEN 'caption_nul_removed' END,
                                     CASE WHEN length(t) > $max_chars THEN 'caption_truncated' END), '') AS flags
        FROM (
            SELECT CAST(image_id AS VARCHAR) AS image_id,
                   trim(replace({raw}, chr(0), ''), '{ws}') AS t,
                   contains({raw}, chr(0)) AS has_nul,
                   {status} AS status, file_row_number AS row_number
            FROM {scan} WHERE image_id IS NOT NULL
        )"""


def check_landing_captions(con, src: LandingSource, max_chars: int) -> int:
    """Read every row once (so encoding errors surface now); returns the row count."""
    sql = landing_captions_sql(con, src)
    # sum(length(text)) makes DuckDB decode every caption, so bad text fails here.
    return landing_query(
        con, src, f"SELECT count(*), sum(length(text)) FROM ({sql})",
        {"path": scan_path(src), "max_chars": max_chars}, fetch=lambda r: r.fetchone()[0],
    )


def read_landing_captions(src: LandingSource, max_chars: int) -> pa.Table:
    """One landing source's cleaned captions as an Arrow table (image_id, text, status, flags)."""
    import duckdb

    con = duckdb.connect()
    try:
        sql = landing_captions_sql(con, src)
        return landing_query(
            con, src, f"SELECT image_id, text, status, flags FROM ({sql}) ORDER BY row_number",
            {"path": scan_path(src), "max_chars": max_chars}, fetch=lambda r: r.to_arrow_table(),
        )
    finally:
        con.close()


def load_landing_source(
    con, name: str, parquet: Path, meta: Path, selectors: list[str], max_chars: int
) -> LandingSource:
    """Validate one landing pair completely (files, json, variant, columns, text); CaptionSourceError
    (one line) says why it cannot be used, whatever the files hold. `con` is any DuckDB connection."""
    src = read_landing_meta(name, parquet, meta)
    if src.variant not in selectors:
        near = difflib.get_close_matches(src.variant, list(selectors), n=1)
        raise VariantNotSelected(
            f"{_who(name)}: variant {src.variant!r} is not in captions.selectors {list(selectors)}"
            + (f" (a misspelled selector {near[0]!r}?)" if near else ""),
            variant=src.variant,
        )
    try:
        check_landing_captions(con, src, max_chars)
    except CaptionSourceError as exc:
        exc.variant = src.variant
        raise
    return src


def rejected_sources(con) -> list[dict]:
    """The landing sources the last caption_table run could not use: name, reason, variant."""
    from bucket_assets.core.db import table_exists

    if not table_exists(con, "rejected_caption_sources"):
        return []
    cols = {r[0] for r in con.execute("DESCRIBE rejected_caption_sources").fetchall()}
    variant = "variant" if "variant" in cols else "NULL"
    rows = con.execute(f"SELECT name, reason, {variant} FROM rejected_caption_sources ORDER BY name").fetchall()
    return [{"name": n, "reason": r, "variant": v} for n, r, v in rows]


def caption_warnings(con, selectors: list[str]) -> list[str]:
    """What the caption stage should say out loud: selectors that match no source's variant,
    and landing sources that were rejected (each with its reason)."""
    variants = {r[0] for r in con.execute("SELECT DISTINCT variant FROM caption_sources").fetchall()}
    rejected = rejected_sources(con)
    return selector_warnings(selectors, variants, {r["variant"] for r in rejected if r["variant"]}) + [
        f"rejected: {r['reason']}" for r in rejected
    ]


def selector_warnings(selectors: list[str], variants: set[str], rejected_variants: set[str] = frozenset()) -> list[str]:
    """One line per selector that names no caption variant of any accepted source: it selects
    nothing, and a misspelled one silently loses that source's captions. A warning, not an
    error: a selector may name a variant whose captions have not landed yet."""
    out = []
    known = sorted(variants)
    for i, v in enumerate(selectors):
        if v in variants:
            continue
        near = difflib.get_close_matches(v, sorted(variants | set(rejected_variants)), n=1)
        out.append(
            f"captions.selectors[{i}] {v!r} matches no caption variant of any source"
            f" (variants: {', '.join(known) or 'none'})" + (f"; did you mean {near[0]!r}?" if near else "")
        )
    return out


def _pair_fingerprint(parquet_sha: str, meta_sha: str) -> str:
    return hashlib.sha256(parquet_sha.encode() + meta_sha.encode()).hexdigest()


def landing_fingerprint(parquet: Path, meta: Path) -> str:
    """Content identity of a landing pair: a changed file is a new source version.
    CaptionSourceError (never a hang) unless both are regular files."""
    who = _who(Path(parquet).name.removesuffix(".parquet"))
    return _pair_fingerprint(file_sha256(parquet, who), file_sha256(meta, who))


# The waterfall ---------------------------------------------------------------------------

WATERFALL_SQL = """
WITH sel AS (
    SELECT * FROM (SELECT unnest($selectors) AS variant, generate_subscripts($selectors, 1) - 1 AS selector_index)
),
candidates AS (
    SELECT c.image_id, c.text, c.variant, sel.selector_index, s.source_id,
           row_number() OVER (
               PARTITION BY c.image_id
               ORDER BY sel.selector_index, s.created_at DESC, s.source_id DESC
           ) AS rn
    FROM captions c
    JOIN sel ON sel.variant = c.variant
    JOIN caption_sources s ON s.source_id = c.source_id
    WHERE c.status = 'ok' AND c.text IS NOT NULL AND length(trim(c.text, ' \t\n\r')) > 0
)
SELECT i.image_id,
       coalesce(w.text, '') AS text,
       w.variant AS caption_variant,
       w.selector_index AS caption_selector_index,
       w.source_id AS caption_source_id,
       CASE WHEN w.image_id IS NOT NULL THEN 'selected'
            WHEN $missing = 'drop' THEN 'dropped' ELSE 'empty' END AS status
FROM wanted_images i
LEFT JOIN (SELECT * FROM candidates WHERE rn = 1) w USING (image_id)
"""


# Bump when build_caption_table writes other captions from the same inputs.
CAPTION_TABLE_CODE = 1


def build_caption_table(
    con, inputs: list[tuple[str, str, str]], landing: list[LandingSource], max_chars: int
) -> tuple[list[dict], dict[str, int]]:
    """Tables caption_sources and captions from raw_index and validated landing sources.
    Returns the source rows and, per landing source, how many captions name unknown image ids."""
    from bucket_assets.core.db import replace_table

    rows = caption_source_rows(inputs, landing)
    ids = {(r["kind"], r["name"]): r["source_id"] for r in rows}
    replace_table(con, "caption_sources", pa.Table.from_pylist(rows, schema=CAPTION_SOURCES_SCHEMA))
    # Each input source's own captions; the first record (lowest row_id) of a (source, id) pair
    # speaks for it. Deduplicated by ids only: almost every id is unique, so a count-only
    # aggregate finds the few duplicated keys (with their first row_id), and every row is
    # inserted unless its key is duplicated and it is not that first row. No aggregate or window
    # carries the caption strings: at 30M rows those ran out of DuckDB's 3 GB cap, while
    # aggregates and joins over fixed-size values spill.
    con.execute(
        """CREATE OR REPLACE TABLE captions AS
           SELECT r.image_id, s.source_id, s.variant, r.caption AS text,
                  CASE WHEN r.caption IS NULL OR r.caption = '' THEN 'empty' ELSE 'ok' END AS status,
                  r.notes AS flags
           FROM raw_index r
           JOIN caption_sources s ON s.kind = 'input' AND s.name = r.source
           LEFT JOIN (SELECT source, image_id, min(row_id) AS first_row FROM raw_index
                      GROUP BY source, image_id HAVING count(*) > 1) d
                  ON d.source = r.source AND d.image_id IS NOT DISTINCT FROM r.image_id
           WHERE d.first_row IS NULL OR d.first_row = r.row_id"""
    )
    unknown = {}
    for src in landing:
        sql = landing_captions_sql(con, src)
        params = {"path": scan_path(src), "max_chars": max_chars}
        # One caption per image per source: the first row (lowest row_number) for an id wins,
        # found by ids only as above ({sql} twice: the first scan reads only image_id and the
        # row number; its image_id is never NULL).
        con.execute(
            f"""INSERT INTO captions
                SELECT c.image_id, $sid, $variant, c.text, c.status, c.flags
                FROM ({sql}) c
                LEFT JOIN (SELECT image_id, min(row_number) AS first_row FROM ({sql})
                           GROUP BY image_id HAVING count(*) > 1) d ON d.image_id = c.image_id
                WHERE d.first_row IS NULL OR d.first_row = c.row_number""",
            {**params, "sid": ids[("landing", src.name)], "variant": src.variant},
        )
        unknown[src.name] = con.execute(
            f"""SELECT count(*) FROM ({sql}) c
                WHERE NOT EXISTS (SELECT 1 FROM raw_index r WHERE r.image_id = c.image_id)""",
            params,
        ).fetchone()[0]
    # What selected_captions checks before it rebuilds (core.db.rebuild_unless_current): the
    # captions are a function of raw_index, the sources (a landing source by its files' sha256)
    # and max_chars.
    from bucket_assets.core.db import derived_version, set_table_version

    set_table_version(con, "captions", derived_version(
        con, ["raw_index"], {"code": CAPTION_TABLE_CODE, "sources": rows, "max_chars": max_chars}))
    return rows, unknown


def select_captions(con, selectors: list[str], missing: str) -> bool:
    """Table selected_captions: the waterfall over every image with an ok bucket assignment. Kept
    as it is when the captions, the assignments and the rules are those it was built from;
    returns whether it was built."""
    from bucket_assets.core.db import rebuild_unless_current

    def build() -> None:
        con.execute(WANTED_IMAGES_SQL)
        con.execute("CREATE OR REPLACE TABLE selected_captions AS " + select_captions_sql(),
                    {"selectors": selectors, "missing": missing})

    return rebuild_unless_current(con, "selected_captions", ["captions", "bucket_assignments"],
                                  {"selectors": list(selectors), "missing": missing,
                                   "sql": [WANTED_IMAGES_SQL, WATERFALL_SQL]}, build)


WANTED_IMAGES_SQL = """CREATE OR REPLACE TEMP VIEW wanted_images AS
SELECT DISTINCT image_id FROM bucket_assignments WHERE status = 'ok'"""


def select_captions_sql() -> str:
    """SQL over tables `captions`, `caption_sources` and `wanted_images(image_id)`.

    Rules: the first selector (variant) with an ok, non-empty caption wins; within a selector the
    newest source (created_at, then the higher source_id) wins. Images without any get an empty
    caption (missing=empty) or status 'dropped' (missing=drop). Parameters: $selectors, $missing.
    """
    return WATERFALL_SQL


CAPTION_SOURCES_SCHEMA = pa.schema(
    [
        ("source_id", pa.int32()),
        ("name", pa.string()),
        ("kind", pa.string()),  # input (a dataset source's own captions) | landing
        ("variant", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("created_at", pa.int64()),
        ("system_prompt_sha256", pa.string()),
        ("user_prompt_sha256", pa.string()),
        ("file", pa.string()),
        ("fingerprint", pa.string()),
    ]
)


def caption_source_rows(inputs: list[tuple[str, str, str]], landing: list[LandingSource]) -> list[dict]:
    """The caption source table. inputs: (source name, source kind, caption_variant).

    Ids are 1.. in (created_at, kind, name) order: input sources (created_at 0) first, then landing
    sources oldest first, so a newly landed (newer) source takes the next id and existing ids stay.
    """
    rows = [
        dict(name=n, kind="input", variant=v, backend="source", model=f"{k}:{n}", created_at=0,
             system_prompt_sha256=None, user_prompt_sha256=None, file=None, fingerprint=None)
        for n, k, v in inputs
    ]
    rows += [
        dict(name=s.name, kind="landing", variant=s.variant, backend=s.backend, model=s.model,
             created_at=s.created_at, system_prompt_sha256=s.system_prompt_sha256,
             user_prompt_sha256=s.user_prompt_sha256, file=os.path.basename(s.parquet_path),
             fingerprint=s.fingerprint)
        for s in landing
    ]
    rows.sort(key=lambda r: (r["created_at"], r["kind"] != "input", r["name"]))
    for i, r in enumerate(rows, start=1):
        r["source_id"] = i
    return rows


CHANGED_BUCKETS_SQL = """
WITH wanted AS (
    SELECT p.bucket_id, p.image_id, sc.text, sc.caption_variant, sc.caption_selector_index, sc.caption_source_id
    FROM processed_images p JOIN selected_captions sc USING (image_id)
    WHERE p.status = 'ok' AND sc.status <> 'dropped'
),
written AS (
    SELECT bucket_id, image_id, text, caption_variant, caption_selector_index, caption_source_id FROM shard_samples
),
diff AS (
    (SELECT * FROM wanted EXCEPT SELECT * FROM written)
    UNION ALL
    (SELECT * FROM written EXCEPT SELECT * FROM wanted)
)
SELECT DISTINCT bucket_id FROM diff ORDER BY bucket_id
"""


def changed_buckets(con) -> list[str]:
    """Buckets whose written samples differ from what the current caption selection wants
    (a caption, its provenance, or a sample dropped or added by the missing-caption policy)."""
    return [r[0] for r in con.execute(CHANGED_BUCKETS_SQL).fetchall()]
