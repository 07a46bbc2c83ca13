"""The caption sensors evaluated with build_sensor_context against a real built export."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import dagster as dg

from bucket_assets.core.manifest import verify_export
from bucket_assets.definitions import build_definitions
from bucket_assets.defs.resources import DatasetResource
from bucket_assets.defs.sensors import (
    REASON_TAG,
    caption_change_sensor,
    caption_landing_sensor,
)
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all

META = {
    "variant": "caption_gemini_2_flash_lite",
    "backend": "openrouter",
    "model": "google/gemini-2.5-flash-lite",
    "created_at": 1790000000,
    "system_prompt_sha256": "a" * 64,
    "user_prompt_sha256": "b" * 64,
}


@pytest.fixture
def built(make_spec, sample_root, tmp_path):
    """A built export whose landing dir is a private copy (sensors move files around)."""
    import shutil

    landing = tmp_path / "landing"
    shutil.copytree(sample_root / "captions", landing)
    spec_path = make_spec("sensors", **{"captions.landing_dir": str(landing)})
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_all(spec_path, instance).success
    return spec_path, instance, landing


def _ctx(spec_path, instance, cursor=None):
    return dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"dataset": DatasetResource(spec_path=str(spec_path))}
    )


def _bucket_images(spec_path) -> dict[str, list[str]]:
    con = duckdb.connect(str(load_spec(spec_path).db_path), read_only=True)
    try:
        rows = con.execute("SELECT bucket_id, image_id FROM shard_samples ORDER BY bucket_id, image_id").fetchall()
    finally:
        con.close()
    out: dict[str, list[str]] = {}
    for b, i in rows:
        out.setdefault(b, []).append(i)
    return out


def _land(landing: Path, name: str, ids: list[str], meta: dict = META, captions=None, write_json=True, **cols):
    table = pa.table({"image_id": ids, "caption": captions or [f"recaptioned {i}" for i in ids], **cols})
    pq.write_table(table, landing / f"{name}.parquet")
    if write_json:
        (landing / f"{name}.json").write_text(json.dumps(meta))


def _execute(spec_path, instance, request: dg.RunRequest):
    job = build_definitions(str(spec_path)).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=request.asset_selection,
        partition_key=request.partition_key,
        tags=request.tags,
    )
    assert result.success
    return result


def test_already_built_sources_trigger_nothing(built):
    spec_path, instance, _ = built
    result = caption_landing_sensor(_ctx(spec_path, instance))
    assert not result.run_requests


def test_new_source_reshards_exactly_the_changed_bucket(built):
    spec_path, instance, landing = built
    export = Path(load_spec(spec_path).output_dir)
    buckets = _bucket_images(spec_path)
    target = max(buckets, key=lambda b: len(buckets[b]))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}

    # Incomplete pair: the parquet without its json is ignored.
    _land(landing, "gemini_v2", buckets[target], write_json=False)
    assert not caption_landing_sensor(_ctx(spec_path, instance)).run_requests

    (landing / "gemini_v2.json").write_text(json.dumps(META))
    ctx = _ctx(spec_path, instance)
    result = caption_landing_sensor(ctx)
    assert len(result.run_requests) == 1
    req = result.run_requests[0]
    assert {k.path[-1] for k in req.asset_selection} == {"caption_table", "selected_captions"}
    assert "gemini_v2" in req.tags[REASON_TAG]
    # The same files seen again request the same run (run_key dedupes it).
    again = caption_landing_sensor(_ctx(spec_path, instance, result.cursor))
    assert [r.run_key for r in again.run_requests] == [req.run_key]

    _execute(spec_path, instance, req)
    assert not caption_landing_sensor(_ctx(spec_path, instance, result.cursor)).run_requests

    change = caption_change_sensor(_ctx(spec_path, instance))
    assert [r.partition_key for r in change.run_requests] == [target]
    for r in change.run_requests:
        _execute(spec_path, instance, r)
    final = caption_change_sensor(_ctx(spec_path, instance, change.cursor))
    assert [{k.path[-1] for k in r.asset_selection} for r in final.run_requests] == [{"export_manifest", "dataset_card"}]
    mats = _execute(spec_path, instance, final.run_requests[0])
    assert mats.success

    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}
    assert set(after) == set(before)
    for p in after:
        assert (after[p] != before[p]) == (p.parent.name == target), p
    manifest = json.loads((export / "manifest.json").read_text())
    assert "google/gemini-2.5-flash-lite" in [s["model"] for s in manifest["caption_sources"]]
    assert "google/gemini-2.5-flash-lite" in (export / "README.md").read_text()
    verify_export(export)
    # Nothing pending: the sensor is quiet again.
    assert not caption_change_sensor(_ctx(spec_path, instance, final.cursor)).run_requests


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_column", "missing column 'caption'"),
        ("json_missing_field", "missing model"),
        ("all_unknown_ids", "none of its 2 image ids"),
        ("not_utf8", "not valid UTF-8"),
    ],
)
def test_bad_source_is_rejected_and_moved_aside(built, case, expect):
    spec_path, instance, landing = built
    export = Path(load_spec(spec_path).output_dir)
    manifest_before = (export / "manifest.json").read_bytes()
    ids = _bucket_images(spec_path)
    some = next(iter(ids.values()))[:2]
    meta = dict(META)
    if case == "missing_column":
        pq.write_table(pa.table({"image_id": some, "text": ["a", "b"]}), landing / "bad.parquet")
        (landing / "bad.json").write_text(json.dumps(meta))
    elif case == "json_missing_field":
        meta.pop("model")
        _land(landing, "bad", some, meta)
    elif case == "all_unknown_ids":
        _land(landing, "bad", ["nope-1", "nope-2"], meta)
    else:
        pq.write_table(pa.table({"image_id": some, "caption": pa.array([b"ok", b"\xff\xfe bad"], pa.binary())}),
                       landing / "bad.parquet")
        (landing / "bad.json").write_text(json.dumps(meta))
    result = caption_landing_sensor(_ctx(spec_path, instance))
    assert not result.run_requests
    rejected = landing / "rejected"
    assert (rejected / "bad.parquet").exists() and (rejected / "bad.json").exists()
    assert expect in (rejected / "bad.reason.txt").read_text()
    assert not (landing / "bad.parquet").exists()
    assert (export / "manifest.json").read_bytes() == manifest_before


def test_a_source_whose_variant_no_selector_names_stays_in_place_until_the_spec_names_it(built):
    """Not a bad file: a misspelled or missing selector is the spec's fault, so the pair is not
    moved to rejected/; it counts once the spec names its variant."""
    spec_path, instance, landing = built
    some = next(iter(_bucket_images(spec_path).values()))[:2]
    _land(landing, "later", some, {**META, "variant": "caption_unheard_of"})
    result = caption_landing_sensor(_ctx(spec_path, instance))
    assert not result.run_requests
    assert (landing / "later.parquet").exists() and not (landing / "rejected").exists()
    assert not caption_landing_sensor(_ctx(spec_path, instance, result.cursor)).run_requests
    d = yaml.safe_load(spec_path.read_text())
    d["captions"]["selectors"] = ["caption_unheard_of", *d["captions"]["selectors"]]
    spec_path.write_text(yaml.safe_dump(d))
    again = caption_landing_sensor(_ctx(spec_path, instance, result.cursor))
    assert len(again.run_requests) == 1 and "later" in again.run_requests[0].tags[REASON_TAG]


def test_unknown_ids_in_a_good_source_are_counted_not_fatal(built):
    spec_path, instance, landing = built
    ids = next(iter(_bucket_images(spec_path).values()))[:1]
    _land(landing, "partial", ids + ["ghost-1", "ghost-2"])
    result = caption_landing_sensor(_ctx(spec_path, instance))
    assert len(result.run_requests) == 1
    res = _execute(spec_path, instance, result.run_requests[0])
    mat = [m for m in res.get_asset_materialization_events() if m.asset_key.path[-1] == "caption_table"][0]
    assert mat.materialization.metadata["unknown_image_ids"].value["partial"] == 2
