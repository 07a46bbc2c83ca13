"""Values read from sources, made safe to store: the one place a scanned value is converted.

Web-scraped metadata holds NaN, infinities, integers of thousands of digits, lone UTF-16
surrogates, bytes that are not UTF-8 and JSON nested past the recursion limit. Every converter
here returns a usable value or None (plus a flag saying what was repaired or ignored) and never
raises, so one record's metadata cannot abort a scan.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from typing import BinaryIO

INT32_MAX = 2**31 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_JSON_DEPTH = 64  # deeper values are dropped from the stored metadata (flag json_too_deep)


def text(value: object) -> tuple[str | None, bool]:
    """A string that UTF-8 can hold; (None, False) for None/NaN. bool: something was replaced
    (bytes that are not UTF-8, lone surrogates)."""
    if value is None:
        return None, False
    if isinstance(value, float) and math.isnan(value):
        return None, False
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), True
    if not isinstance(value, str):
        try:
            value = str(value)
        except Exception:  # noqa: BLE001 - e.g. int too large to convert to a string
            return None, True
    try:
        value.encode("utf-8")
        return value, False
    except UnicodeEncodeError:
        # Lone surrogates (a JSON "\ud800" escape, or a name decoded with surrogateescape).
        return _SURROGATE.sub("\ufffd", value), True


def name(value: str) -> tuple[str, bool]:
    """A file or member name as text. Names that are not UTF-8 reach Python as surrogate
    escapes; they become `\\xNN` escapes, which keeps two different byte names distinct."""
    try:
        value.encode("utf-8")
        return value, False
    except UnicodeEncodeError:
        raw = value.encode("utf-8", errors="surrogateescape") if _only_escapes(value) else value.encode(
            "utf-8", errors="surrogatepass")
        return raw.decode("utf-8", errors="backslashreplace"), True


def _only_escapes(value: str) -> bool:
    try:
        value.encode("utf-8", errors="surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def size(value: object) -> tuple[int | None, bool]:
    """A pixel dimension: an integer in 1..2^31-1 (an integral float counts), else None.
    bool: the value was present but unusable."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, False
    if isinstance(value, bool):
        return None, True
    if isinstance(value, int):
        return (value, False) if 0 < value <= INT32_MAX else (None, True)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and 0 < value <= INT32_MAX:
            return int(value), False
        return None, True
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 10:
        return size(int(value.strip()))
    return None, True


def number(value: object) -> tuple[float | None, bool]:
    """A finite float (similarity, scores), else None; bool: present but unusable (strings,
    NaN, infinities, integers too large for a float)."""
    if value is None:
        return None, False
    if isinstance(value, bool):
        return None, True
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None, True
    if not math.isfinite(f):
        return None, True
    return f, False


def json_safe(value: object, depth: int = 0) -> tuple[object, set[str]]:
    """A copy that json.dumps writes as valid JSON and UTF-8 can hold: NaN/inf become null,
    huge integers become strings, text is repaired, nesting past MAX_JSON_DEPTH is dropped."""
    flags: set[str] = set()
    if depth > MAX_JSON_DEPTH:
        return None, {"json_too_deep"}
    if value is None or isinstance(value, bool):
        return value, flags
    if isinstance(value, int):
        if abs(value) < 2**63:
            return value, flags
        s, _ = text(value)
        return s, {"json_huge_int"}
    if isinstance(value, float):
        return (value if math.isfinite(value) else None), flags
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key, bad = text(k)
            if bad:
                flags.add("json_not_utf8")
            out[key if key is not None else "null"], f = json_safe(v, depth + 1)
            flags |= f
        return out, flags
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            item, f = json_safe(v, depth + 1)
            items.append(item)
            flags |= f
        return items, flags
    s, bad = text(value)
    if bad:
        flags.add("json_not_utf8")
    return s, flags


def load_json_object(raw: bytes) -> tuple[dict | None, set[str]]:
    """A sidecar's JSON object as parsed (pass it through json_safe before storing it), or None
    with the flag saying why: json_invalid (not JSON, nested past the parser's limit, an
    integer of too many digits) or json_not_object."""
    try:
        value = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so is int digit limits
        return None, {"json_invalid"}
    if not isinstance(value, dict):
        return None, {"json_not_object"}
    return value, set()


def read_prefix(f: BinaryIO, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes from a file object; bool: there was more."""
    data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def caption_bytes_limit(max_chars: int) -> int:
    """Bytes enough to hold max_chars UTF-8 characters after trimming: read no more than this
    of a caption file (a 10 GB .txt is cut, not loaded)."""
    return 4 * max_chars + 4096


def decode_prefix(data: bytes, cut: bool) -> tuple[str, bool]:
    """UTF-8 text of a file's first bytes; a character split by the cut is dropped, not replaced.
    bool: bytes that are not UTF-8 were replaced."""
    if not cut:
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace"), True
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        return dec.decode(data, final=False), False
    except UnicodeDecodeError:
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        return dec.decode(data, final=False), True


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file that is not a symlink: FIFOs (which block on open), devices, directories
    and links are never opened as inputs."""
    import stat

    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False
