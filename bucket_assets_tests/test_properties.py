"""Property-based tests (hypothesis) for the three intake parsers: the spec loader, the caption
source reader and the tar reader. Each must either return a well-formed result or raise its
one documented error type with a one-line message, for any input."""

from __future__ import annotations

import copy
import gzip
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bucket_assets.core.captions import CaptionSourceError, clean_caption, load_landing_source, read_landing_captions
from bucket_assets.core.sources import ScanStats, read_bytes
from bucket_assets.core.sources.webdataset import scan
from bucket_assets.spec import SpecError, WebDatasetSource, load_spec, parse_spec

# Reproducible in CI: the same examples every run, no wall-clock deadline on a busy 2-core box.
PROPS = settings(derandomize=True, deadline=None, max_examples=150,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- the spec loader -----------------------------------------------------------------------------

VALID = {
    "name": "demo", "output_dir": "out", "work_dir": "work",
    "sources": [{"name": "pics", "kind": "folder", "path": "images"}],
    "filters": {"min_similarity": 0.3, "drop_nsfw": ["NSFW"]},
    "buckets": {"base_resolutions": [512], "divisible": 32},
    "image": {"mode": "reencode_jpeg", "jpeg": {"quality": 95}, "workers": 1},
    "captions": {"selectors": ["alt_text"], "missing": "empty", "max_chars": 100},
    "shards": {"max_samples": 10},
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, prefix + (i,))


SPEC_PATHS = [p for p in _paths(VALID) if p]


def _assert_one_line(exc: Exception) -> None:
    msg = str(exc)
    assert msg.startswith("spec error") and "\n" not in msg, msg


@PROPS
@given(st.lists(st.tuples(st.sampled_from(SPEC_PATHS), values, st.booleans()), min_size=1, max_size=3))
def test_spec_loader_mutated_specs(tmp_path, mutations):
    """Replace values (or add unknown sibling keys) anywhere in a valid spec: the loader
    returns a Spec or raises SpecError with one line naming a location."""
    data = copy.deepcopy(VALID)
    for path, value, add_key in mutations:
        node = data
        try:
            for part in path[:-1]:
                node = node[part]
            if add_key and isinstance(node, dict):
                node[f"x_{path[-1]}"] = value
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        spec = parse_spec(data, tmp_path)
    except SpecError as exc:
        _assert_one_line(exc)
        return
    assert spec.name and spec.sources


@PROPS
@given(st.one_of(st.binary(max_size=300), values.map(lambda v: yaml.safe_dump(v).encode())))
def test_spec_loader_arbitrary_files(tmp_path, content):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    try:
        load_spec(path)
    except SpecError as exc:
        _assert_one_line(exc)


# -- the caption source reader --------------------------------------------------------------------

caption_text = st.one_of(st.none(), st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
                         st.sampled_from(["\x00", " \u3000 ", "a\x00b", "\t\n", "\u00a0x\u00a0", "é" * 70]))


@PROPS
@given(captions=st.lists(caption_text, max_size=8), max_chars=st.integers(1, 50))
def test_clean_caption_is_normal_form(captions, max_chars):
    for raw in captions:
        for value in (raw, None if raw is None else raw.encode("utf-8")):
            text, flags = clean_caption(value, max_chars)
            if raw is None:
                assert text is None and flags == []
                continue
            assert "\x00" not in text and len(text) <= max_chars and text == text.strip()
            assert ("caption_nul_removed" in flags) == ("\x00" in raw)
            assert clean_caption(text, max_chars) == (text, [])  # idempotent


def _landing_pair(d: Path, table: pa.Table) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    parquet, meta = d / "src.parquet", d / "src.json"
    pq.write_table(table, parquet)
    meta.write_text(json.dumps({"variant": "caption_x", "backend": "b", "model": "m", "created_at": 1,
                                "system_prompt_sha256": "a", "user_prompt_sha256": "b"}))
    return parquet, meta


id_columns = st.one_of(
    st.lists(st.one_of(st.none(), st.text(max_size=8)), min_size=1, max_size=8).map(lambda v: pa.array(v, pa.string())),
    st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), min_size=1, max_size=8).map(lambda v: pa.array(v, pa.int64())),
    st.lists(st.floats(allow_nan=True), min_size=1, max_size=8).map(lambda v: pa.array(v, pa.float64())),
)
caption_columns = st.one_of(
    st.lists(caption_text, min_size=1, max_size=8).map(lambda v: pa.array(v, pa.string())),
    st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=1, max_size=8).map(lambda v: pa.array(v, pa.binary())),
    st.lists(st.integers(0, 9), min_size=1, max_size=8).map(lambda v: pa.array(v, pa.int64())),
)


@PROPS
@given(ids=id_columns, caps=caption_columns, drop=st.sampled_from([None, "image_id", "caption"]),
       max_chars=st.integers(1, 40))
def test_landing_caption_reader(tmp_path_factory, ids, caps, drop, max_chars):
    """Any landing parquet either loads, with every caption cleaned exactly as clean_caption
    cleans a source's caption, or is rejected with one CaptionSourceError line."""
    import duckdb

    n = min(len(ids), len(caps))
    cols = {"image_id": ids.slice(0, n), "caption": caps.slice(0, n)}
    if drop:
        del cols[drop]
    parquet, meta = _landing_pair(tmp_path_factory.mktemp("landing"), pa.table(cols))
    con = duckdb.connect()
    try:
        src = load_landing_source(con, "src", parquet, meta, ["caption_x"], max_chars)
    except CaptionSourceError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("caption source src: ")
        return
    finally:
        con.close()
    assert drop is None and not pa.types.is_floating(ids.type) and not pa.types.is_integer(caps.type)
    out = read_landing_captions(src, max_chars).to_pylist()
    expected = []
    for i in range(n):
        raw_id, raw_cap = cols["image_id"][i].as_py(), cols["caption"][i].as_py()
        if raw_id is None:
            continue
        text, flags = clean_caption(raw_cap, max_chars)
        expected.append({"image_id": str(raw_id), "text": text, "flags": ",".join(flags) or None})
    assert [{k: r[k] for k in ("image_id", "text", "flags")} for r in out] == expected


# -- the tar reader ------------------------------------------------------------------------------

member_names = st.one_of(
    st.sampled_from(["a.jpg", "a.txt", "a.json", "b.jpg", "b.png", "c.txt", "../x.jpg", "/abs.jpg", "d/e.jpg",
                     "f.key.jpg", "g h.jpg", ".hidden.jpg", "noext", "k.JPG", "dir/", "a.jpg"]),
    st.text(alphabet="abc./ _-", min_size=1, max_size=10),
)
member_types = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                         tarfile.CHRTYPE, tarfile.FIFOTYPE])
members = st.lists(st.tuples(member_names, member_types, st.binary(max_size=700)), max_size=10)


def _tar_bytes(items) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, data in items:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if kind == tarfile.REGTYPE:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.linkname = "a.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tf.addfile(ti)
    return buf.getvalue()


@PROPS
@given(items=members, cut=st.one_of(st.none(), st.integers(0, 6000)), gz=st.booleans(), cut_gz=st.booleans())
def test_tar_reader(tmp_path_factory, items, cut, gz, cut_gz):
    """Any tar (unsafe names, links, devices, duplicates, cut anywhere, gzipped): the scan
    yields records or raises OSError for a file that is not a tar at all; an image record's
    bytes read back exactly; unsafe members are never records."""
    data = _tar_bytes(items)
    if cut is not None and not (gz and cut_gz):
        data = data[:cut]
    if gz:
        data = gzip.compress(data, mtime=0)
        if cut is not None and cut_gz:
            data = data[: cut // 4]  # a cut gzip stream
    d = tmp_path_factory.mktemp("tars")
    path = d / "00000.tar"
    path.write_bytes(data)
    source = WebDatasetSource(name="w", kind="webdataset", paths=[str(d / "*.tar")])
    stats = ScanStats()
    try:
        records = list(scan(source, stats, 100))
    except OSError as exc:
        assert "cannot open tar" in str(exc) and "\n" not in str(exc)
        return
    first: dict[str, bytes] = {}
    for name, kind, payload in items:
        if kind == tarfile.REGTYPE:
            first.setdefault(name, payload)
    keys = [r.image_id for r in records]
    assert len(keys) == len(set(keys))
    for r in records:
        assert not r.image_id.startswith(("/", "..")) and ".." not in r.image_id.split("/")
        if r.member is not None:
            assert r.member in first
            try:
                got = read_bytes(r.location, r.member, r.offset, r.size)
            except OSError as exc:  # the one error type renders record as read_error
                assert cut is not None, exc
                continue
            if cut is None:
                assert got == first[r.member]
        if r.caption is not None:
            assert "\x00" not in r.caption and len(r.caption) <= 100
    assert all(v > 0 for v in stats.counts.values())
    assert set(stats.counts) <= {"unsafe_tar_member", "unkeyed_tar_member", "duplicate_tar_member",
                                 "truncated_tar", "unreadable_tar"}
    if cut is None and not gz:
        unsafe = sum(1 for name, kind, _ in items
                     if kind != tarfile.REGTYPE or name.startswith("/") or ".." in name.split("/"))
        assert stats.counts.get("unsafe_tar_member", 0) == unsafe
