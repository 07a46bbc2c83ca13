"""Hostile landing caption sources: every bad pair becomes one named, one-line reason (a rejected
source) and never a hang or a traceback, while the good sources next to it still load."""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dagster as dg

from bucket_assets.core.captions import (
    CaptionSourceError,
    discover_landing,
    file_sha256,
    landing_fingerprint,
    load_landing_source,
    read_landing_captions,
)
from bucket_assets.definitions import build_definitions
from bucket_assets.defs.resources import DatasetResource
from bucket_assets.defs.sensors import REASON_TAG, SOURCES_TAG, caption_landing_sensor
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all

VARIANT = "caption_gemini_2_flash_lite"
META = {
    "variant": VARIANT,
    "backend": "openrouter",
    "model": "google/gemini-2.5-flash-lite",
    "created_at": 1790000000,
    "system_prompt_sha256": "a" * 64,
    "user_prompt_sha256": "b" * 64,
}


@contextmanager
def deadline(seconds: int = 20):
    """Fail instead of hanging (opening a FIFO blocks until a writer comes)."""

    def boom(signum, frame):
        raise TimeoutError(f"hung for {seconds}s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _parquet(path: Path, ids=("a", "b"), captions=None, **cols) -> Path:
    ids = list(ids)
    with open(path, "wb") as f:  # a file object: pyarrow cannot take a path that is not UTF-8
        pq.write_table(pa.table({"image_id": ids, "caption": captions or [f"cap {i}" for i in ids], **cols}), f)
    return path


def _pair(d: Path, name: str, meta: dict | str = META, **kw) -> tuple[Path, Path]:
    parquet = _parquet(d / f"{name}.parquet", **kw)
    meta_path = d / f"{name}.json"
    meta_path.write_text(meta if isinstance(meta, str) else json.dumps(meta), encoding="utf-8")
    return parquet, meta_path


def _load(name: str, parquet: Path, meta: Path, max_chars: int = 100):
    with deadline(), duckdb.connect() as con:
        return load_landing_source(con, name, parquet, meta, [VARIANT], max_chars)


def _rejected(name: str, parquet: Path, meta: Path) -> str:
    with pytest.raises(CaptionSourceError) as ei:
        _load(name, parquet, meta)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("caption source ")
    msg.encode("utf-8")  # storable and loggable as it is
    return msg


# 1. glob characters in a name -----------------------------------------------------------------


@pytest.mark.parametrize("name, other", [("gem*", "gemini"), ("v[1]", "v1"), ("a?", "ab"), ("[!x]*", "y")])
def test_glob_characters_in_a_name_read_exactly_that_file(tmp_path, name, other):
    parquet, meta = _pair(tmp_path, name, ids=["mine"])
    _parquet(tmp_path / f"{other}.parquet", ids=["other-1", "other-2"])  # no json: not landed
    src = _load(name, parquet, meta)
    assert read_landing_captions(src, 100).column("image_id").to_pylist() == ["mine"]
    assert [n for n, _, _ in discover_landing(tmp_path)] == [name]


def test_glob_named_source_in_the_caption_table(tmp_path):
    from bucket_assets.core.captions import build_caption_table

    parquet, meta = _pair(tmp_path, "gem*", ids=["a", "b"])
    _parquet(tmp_path / "gemini.parquet", ids=["c"], captions=["not landed"])
    con = duckdb.connect()
    con.execute("CREATE TABLE raw_index AS SELECT 'a' AS image_id, 'src' AS source, NULL::VARCHAR AS caption, NULL::VARCHAR AS notes, 0 AS row_id")
    src = load_landing_source(con, "gem*", parquet, meta, [VARIANT], 100)
    build_caption_table(con, [], [src], 100)
    assert con.execute("SELECT image_id, text FROM captions ORDER BY image_id").fetchall() == [("a", "cap a"), ("b", "cap b")]


# 2. non-regular files ----------------------------------------------------------------------------


def _make(path: Path, kind: str, tmp_path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("x")
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "symlink to a FIFO":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    elif kind == "symlink loop":
        path.symlink_to(path)
    elif kind == "symlink to a device":
        path.symlink_to("/dev/null")


KINDS = [("directory", "directory"), ("dangling symlink", "dangling symlink"), ("FIFO", "FIFO"),
         ("symlink to a FIFO", "FIFO"), ("symlink loop", "cannot stat"), ("symlink to a device", "character device")]


@pytest.mark.parametrize("which", ["json", "parquet"])
@pytest.mark.parametrize("kind, expect", KINDS)
def test_non_regular_landing_file_is_rejected_without_opening_it(tmp_path, which, kind, expect):
    parquet, meta = _pair(tmp_path, "src")
    _make(meta if which == "json" else parquet, kind, tmp_path)
    with deadline():
        found = discover_landing(tmp_path)
    assert found == [("src", parquet, meta)]  # a complete pair, so it gets a reason
    msg = _rejected("src", parquet, meta)
    assert expect in msg and f"src.{which}" in msg


@pytest.mark.parametrize("kind, expect", KINDS)
def test_fingerprint_never_opens_a_non_regular_file(tmp_path, kind, expect):
    parquet, meta = _pair(tmp_path, "src")
    _make(meta, kind, tmp_path)
    with deadline(), pytest.raises(CaptionSourceError, match=expect):
        landing_fingerprint(parquet, meta)
    with deadline(), pytest.raises(CaptionSourceError, match=expect):
        file_sha256(meta)


def test_symlink_to_a_regular_file_is_read_as_its_target(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    real_parquet, real_meta = _pair(store, "real", ids=["x"])
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "linked.parquet").symlink_to(real_parquet)
    (landing / "linked.json").symlink_to(real_meta)
    [(name, parquet, meta)] = discover_landing(landing)
    src = _load(name, parquet, meta)
    assert read_landing_captions(src, 100).column("image_id").to_pylist() == ["x"]


def test_discover_landing_never_hangs_or_raises(tmp_path):
    _pair(tmp_path, "good")
    os.mkfifo(tmp_path / "pipe.json")
    os.mkfifo(tmp_path / "pipe.parquet")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "dir.parquet").mkdir()
    (tmp_path / "ghost.json").symlink_to(tmp_path / "absent")
    (tmp_path / "ghost.parquet").symlink_to(tmp_path / "absent")
    (tmp_path / "orphan.json").write_text("{}")
    with deadline():
        names = [n for n, _, _ in discover_landing(tmp_path)]
    assert names == ["dir", "ghost", "good", "pipe"]


# 3. hostile json values ------------------------------------------------------------------------


def _meta_text(**overrides) -> str:
    body = json.dumps(META)[1:-1]
    extra = "".join(f', "{k}": {v}' for k, v in overrides.items())
    # later keys win in json.loads, so an override replaces the good value
    return "{" + body + extra + "}"


@pytest.mark.parametrize(
    "value", ["Infinity", "-Infinity", "NaN", "1e30", "-1", "-0.5", str(10**30), "1e400", "253402300800"]
)
def test_created_at_out_of_range_is_rejected(tmp_path, value):
    parquet, meta = _pair(tmp_path, "src", _meta_text(created_at=value))
    assert "created_at" in _rejected("src", parquet, meta)


def test_created_at_in_range_still_loads(tmp_path):
    for value, expect in [("0", 0), ("1790000000.9", 1790000000), ("253402300799", 253402300799)]:
        parquet, meta = _pair(tmp_path, "src", _meta_text(created_at=value))
        assert _load("src", parquet, meta).created_at == expect


@pytest.mark.parametrize(
    "text, expect",
    [
        (_meta_text(model='"\\ud800"'), "model"),
        (_meta_text(backend='"x\\udfff"'), "backend"),
        (_meta_text(system_prompt_sha256='"\\udc80"'), "system_prompt_sha256"),
        (_meta_text(variant='"\\ud800"'), "variant"),
        (_meta_text(extra="[" * 100_000 + "]" * 100_000), "not valid JSON"),
        (_meta_text(extra="1" * 5000), "not valid JSON"),
        (_meta_text(created_at="1" * 5000), "not valid JSON"),
        ('{"variant": ' * 50_000 + "1" + "}" * 50_000, "not valid JSON"),
        ("\ufeff" + json.dumps(META), "not valid JSON"),
        (json.dumps(META) + "\n" + json.dumps(META), "not valid JSON"),
        (_meta_text(variant='"caption_gemini_2_flash_lite\\n"'), "variant"),
    ],
    ids=["surrogate-model", "surrogate-backend", "surrogate-sha", "surrogate-variant", "deep-array",
         "huge-int-extra", "huge-int-created", "deep-object", "bom", "two-documents", "variant-newline"],
)
def test_hostile_json_is_rejected_not_raised(tmp_path, text, expect):
    parquet, meta = _pair(tmp_path, "src", text)
    assert expect in _rejected("src", parquet, meta)


def test_json_not_utf8_or_oversized_is_rejected(tmp_path):
    parquet, meta = _pair(tmp_path, "src")
    meta.write_bytes(b'{"model": "\xff"}')
    assert "not valid JSON" in _rejected("src", parquet, meta)
    meta.write_text(_meta_text(padding='"' + "x" * (2 << 20) + '"'))
    assert "larger than" in _rejected("src", parquet, meta)


def test_name_that_is_not_utf8_is_rejected(tmp_path):
    name = os.fsdecode(b"bad\xff")  # a lone surrogate once decoded
    parquet, meta = _pair(tmp_path, name)
    assert [n for n, _, _ in discover_landing(tmp_path)] == [name]
    assert "name" in _rejected(name, parquet, meta)
    newline = "two\nlines"
    parquet, meta = _pair(tmp_path, newline)
    assert "name" in _rejected(newline, parquet, meta)


# 4. status -----------------------------------------------------------------------------------------


def test_null_status_does_not_count_as_ok(tmp_path):
    parquet, meta = _pair(tmp_path, "src", ids=["a", "b", "c", "d"], status=["ok", None, "refused", "OK"])
    rows = read_landing_captions(_load("src", parquet, meta), 100).to_pylist()
    assert [r["status"] == "ok" for r in rows] == [True, False, False, False]
    assert rows[1]["status"] is not None  # a named status, so `status <> 'ok'` counts it too
    # A source without a status column: every row is ok.
    parquet, meta = _pair(tmp_path, "plain", ids=["a", "b"])
    assert {r["status"] for r in read_landing_captions(_load("plain", parquet, meta), 100).to_pylist()} == {"ok"}


def test_status_column_of_nulls_only(tmp_path):
    parquet, meta = _pair(tmp_path, "src", ids=["a"], status=pa.array([None], pa.null()))
    rows = read_landing_captions(_load("src", parquet, meta), 100).to_pylist()
    assert rows[0]["status"] != "ok"


# 6. other ways one landing file could raise ---------------------------------------------------------


def _bad_parquet(tmp_path: Path, case: str) -> Path:
    parquet, meta = _pair(tmp_path, "src")
    if case == "not a parquet":
        parquet.write_bytes(b"PAR1 this is not really a parquet file")
    elif case == "0 bytes":
        parquet.write_bytes(b"")
    elif case == "truncated":
        data = _parquet(tmp_path / "full.parquet", ids=[str(i) for i in range(1000)]).read_bytes()
        parquet.write_bytes(data[: len(data) // 2] + data[-8:])
    elif case == "float image_id":
        pq.write_table(pa.table({"image_id": [1.5], "caption": ["c"]}), parquet)
    elif case == "string column not utf8":
        caps = pa.array([b"ok", b"\xff\xfe bad"], pa.binary()).view(pa.string())
        pq.write_table(pa.table({"image_id": ["a", "b"], "caption": caps}), parquet)
    elif case == "image_id not utf8":
        ids = pa.array([b"\xc3\x28"], pa.binary()).view(pa.string())
        pq.write_table(pa.table({"image_id": ids, "caption": ["c"]}), parquet)
    elif case == "binary caption not utf8":
        pq.write_table(pa.table({"image_id": ["a"], "caption": pa.array([b"\xff"], pa.binary())}), parquet)
    elif case == "two caption columns":
        pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])],
                                            names=["image_id", "caption", "caption"]), parquet)
    elif case == "no columns":
        pq.write_table(pa.table({"x": [1]}).drop(["x"]), parquet)
    elif case == "struct caption":
        pq.write_table(pa.table({"image_id": ["a"], "caption": [{"t": "x"}]}), parquet)
    return tmp_path / "src.json"


@pytest.mark.parametrize(
    "case, expect",
    [
        ("not a parquet", "cannot read parquet"),
        ("0 bytes", "cannot read parquet"),
        ("truncated", "cannot read"),
        ("float image_id", "image_id"),
        ("string column not utf8", "not valid UTF-8"),
        ("image_id not utf8", "not valid UTF-8"),
        ("binary caption not utf8", "not valid UTF-8"),
        ("two caption columns", "caption"),
        ("no columns", "missing column 'image_id'"),
        ("struct caption", "caption"),
    ],
)
def test_bad_parquet_is_rejected_with_a_reason(tmp_path, case, expect):
    meta = _bad_parquet(tmp_path, case)
    assert expect in _rejected("src", tmp_path / "src.parquet", meta)


def test_damaged_data_page_is_rejected_with_one_line(tmp_path):
    """The footer reads fine; the damage shows only while rows are scanned (inside DuckDB)."""
    parquet, meta = _pair(tmp_path, "src")
    n = 50_000
    pq.write_table(pa.table({"image_id": [f"id{i}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)]}),
                   parquet, compression="snappy", row_group_size=10_000)
    data = bytearray(parquet.read_bytes())
    for off in range(len(data) // 3, len(data) // 3 + 2000, 7):
        data[off] ^= 0xFF
    parquet.write_bytes(bytes(data))
    msg = _rejected("src", parquet, meta)
    assert "cannot read" in msg and "Traceback" not in msg


def test_reject_source_moves_entries_of_any_kind(tmp_path):
    from bucket_assets.defs.sensors import reject_source

    for round_ in range(2):  # the second time rejected/ already holds these names
        parquet, meta = _pair(tmp_path, "x")
        meta.unlink()
        meta.mkdir()
        (meta / "f").write_text("x")
        parquet.unlink()
        parquet.symlink_to(tmp_path / "absent")
        dest = reject_source(str(tmp_path), "x", parquet, meta, "caption source x: bad")
        assert not os.path.lexists(meta) and not os.path.lexists(parquet), round_
    assert sorted(p.name for p in dest.iterdir()) == ["x.json", "x.json.1", "x.parquet", "x.reason.txt"]
    assert (dest / "x.parquet").is_symlink()


def test_extra_columns_do_not_clash_with_the_reader(tmp_path):
    """A column the reader itself uses internally (file_row_number, t, has_nul) is just data."""
    parquet, meta = _pair(tmp_path, "src", ids=["a", "b"], file_row_number=[7, 3], t=["x", "y"], has_nul=[True, False])
    rows = read_landing_captions(_load("src", parquet, meta), 100).to_pylist()
    assert [(r["image_id"], r["text"]) for r in rows] == [("a", "cap a"), ("b", "cap b")]


def test_row_order_is_file_order_across_batches(tmp_path):
    ids = [f"id{i:06d}" for i in range(200_000)][::-1]
    parquet, meta = _pair(tmp_path, "src", ids=ids, captions=[f"c{i}" for i in range(len(ids))])
    out = read_landing_captions(_load("src", parquet, meta), 100)
    assert out.column("image_id").to_pylist() == ids


# 5. the sensor and the asset: bad pairs are set aside, the good one still loads --------------------


def _hostile_pairs(landing: Path, known: list[str]) -> dict[str, str]:
    """Bad pairs next to one good one; name -> a word its reason must hold."""
    expect = {}
    p, m = _pair(landing, "dir_json", ids=known)
    m.unlink()
    m.mkdir()
    expect["dir_json"] = "directory"
    p, m = _pair(landing, "ghost_json", ids=known)
    m.unlink()
    m.symlink_to(landing / "absent.json")
    expect["ghost_json"] = "dangling symlink"
    p, m = _pair(landing, "fifo_json", ids=known)
    m.unlink()
    os.mkfifo(m)
    expect["fifo_json"] = "FIFO"
    p, m = _pair(landing, "dir_parquet", ids=known)
    p.unlink()
    p.mkdir()
    expect["dir_parquet"] = "directory"
    _pair(landing, "nan_created", _meta_text(created_at="NaN"), ids=known)
    expect["nan_created"] = "created_at"
    _pair(landing, "surrogate_model", _meta_text(model='"\\ud800"'), ids=known)
    expect["surrogate_model"] = "model"
    _pair(landing, "deep_json", _meta_text(extra="[" * 100_000 + "]" * 100_000), ids=known)
    expect["deep_json"] = "not valid JSON"
    _pair(landing, os.fsdecode(b"bad\xffname"), ids=known)
    expect[os.fsdecode(b"bad\xffname")] = "name"
    p, _ = _pair(landing, "empty_parquet", ids=known)
    p.write_bytes(b"")
    expect["empty_parquet"] = "cannot read parquet"
    _pair(landing, "null_status", ids=known, status=[None] * len(known))  # loads: just no ok captions
    return expect


@pytest.fixture
def built(make_spec, sample_root, tmp_path):
    landing = tmp_path / "landing"
    shutil.copytree(sample_root / "captions", landing)
    spec_path = make_spec("hostile_landing", **{"captions.landing_dir": str(landing)})
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_all(spec_path, instance).success
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        known = [r[0] for r in con.execute("SELECT image_id FROM raw_index ORDER BY image_id LIMIT 3").fetchall()]
    finally:
        con.close()
    return spec_path, instance, landing, known


def _run(spec_path, instance, asset_selection, tags=None):
    job = build_definitions(str(spec_path)).resolve_implicit_global_asset_job_def()
    with deadline(120):
        return job.execute_in_process(instance=instance, asset_selection=asset_selection, tags=tags or {},
                                      raise_on_error=False)


def test_sensor_rejects_bad_pairs_and_requests_the_good_one_in_the_same_tick(built):
    spec_path, instance, landing, known = built
    _pair(landing, "good*", ids=known)  # a glob character, and good
    _parquet(landing / "goodies.parquet", ids=["nope"])  # not landed: must not be read for good*
    expect = _hostile_pairs(landing, known)
    ctx = dg.build_sensor_context(instance=instance, resources={"dataset": DatasetResource(spec_path=str(spec_path))})
    with deadline(60):
        result = caption_landing_sensor(ctx)
    assert len(result.run_requests) == 1
    req = result.run_requests[0]
    assert req.tags[SOURCES_TAG] == "good*,null_status"
    assert "good*" in req.tags[REASON_TAG]
    rejected = landing / "rejected"
    for name, word in expect.items():
        reason = (rejected / f"{name}.reason.txt").read_text(encoding="utf-8")
        assert word in reason and reason.count("\n") == 1, (name, reason)
        assert not os.path.lexists(landing / f"{name}.json") and not os.path.lexists(landing / f"{name}.parquet"), name
        assert os.path.lexists(rejected / f"{name}.json") and os.path.lexists(rejected / f"{name}.parquet"), name
    assert (landing / "good*.parquet").exists()
    # The next tick sees nothing new to reject and requests the same run.
    with deadline(60):
        again = caption_landing_sensor(dg.build_sensor_context(
            instance=instance, cursor=result.cursor, resources={"dataset": DatasetResource(spec_path=str(spec_path))}))
    assert [r.run_key for r in again.run_requests] == [req.run_key]
    res = _run(spec_path, instance, req.asset_selection, req.tags)
    assert res.success
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM rejected_caption_sources").fetchone()[0] == 0
        names = {r[0] for r in con.execute("SELECT name FROM caption_sources WHERE kind = 'landing'").fetchall()}
        assert {"good*", "null_status"} <= names
        sid = con.execute("SELECT source_id FROM caption_sources WHERE name = 'good*'").fetchone()[0]
        got = con.execute("SELECT image_id FROM captions WHERE source_id = ? ORDER BY image_id", [sid]).fetchall()
        assert [r[0] for r in got] == sorted(known)
    finally:
        con.close()


def test_caption_table_records_bad_pairs_and_loads_the_good_one(built):
    spec_path, instance, landing, known = built
    _pair(landing, "good[1]", ids=known)
    _parquet(landing / "good1.parquet", ids=["nope"])  # not landed
    expect = _hostile_pairs(landing, known)
    res = _run(spec_path, instance, [dg.AssetKey("caption_table"), dg.AssetKey("selected_captions")])
    assert res.success
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        rejected = dict(con.execute("SELECT name, reason FROM rejected_caption_sources").fetchall())
        sid = con.execute("SELECT source_id FROM caption_sources WHERE name = 'good[1]'").fetchone()[0]
        got = con.execute("SELECT image_id FROM captions WHERE source_id = ? ORDER BY image_id", [sid]).fetchall()
        null_sid = con.execute("SELECT source_id FROM caption_sources WHERE name = 'null_status'").fetchone()[0]
        null_ok = con.execute("SELECT count(*) FROM captions WHERE source_id = ? AND status = 'ok'", [null_sid]).fetchone()[0]
    finally:
        con.close()
    assert [r[0] for r in got] == sorted(known)
    assert null_ok == 0
    shown = {n.encode("utf-8", "backslashreplace").decode(): w for n, w in expect.items()}
    assert len(rejected) == len(shown)
    for name, word in shown.items():
        assert name in rejected, (name, sorted(rejected))
        assert word in rejected[name] and "\n" not in rejected[name], (name, rejected[name])
    mat = [m for m in res.get_asset_materialization_events() if m.asset_key.path[-1] == "caption_table"][0]
    assert set(mat.materialization.metadata["rejected_sources"].value) == set(shown)
