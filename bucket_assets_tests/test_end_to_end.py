"""End to end: the real definitions materialized into temp dirs, read back like a user would."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from bucket_assets.core.buckets import bucket_table
from bucket_assets.core.card import extract_snippets
from bucket_assets.core.manifest import verify_export
from bucket_assets.core.shards import SAMPLE_JSON_KEYS, read_shard
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import materialize_all, run_cli


def _shards(export: Path) -> dict[str, bytes]:
    return {str(p.relative_to(export)): p.read_bytes() for p in sorted(export.rglob("shard-*.tar"))}


def _selected(work: Path) -> dict[str, tuple]:
    con = duckdb.connect(str(work / "metadata.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT image_id, text, caption_variant, caption_selector_index, caption_source_id FROM selected_captions"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def _run_snippets(export: Path) -> tuple[list, list]:
    card = (export / "README.md").read_text(encoding="utf-8")
    wds_code, tar_code = extract_snippets(card)
    assert "import webdataset" in wds_code and "tarfile.open" in tar_code
    cwd = os.getcwd()
    os.chdir(export)
    try:
        ns: dict = {"seen": []}
        exec(wds_code.replace("    ...", "    seen.append((jpg, caption, meta))"), ns)
        wds_seen = ns["seen"]
        tar_seen: list = []
        marker = 'tar_path = next(Path("buckets").rglob("shard-*.tar"))'
        assert marker in tar_code
        for shard in sorted(Path("buckets").rglob("shard-*.tar")):
            ns = {"seen": tar_seen, "TAR_PATH": shard}
            exec(
                tar_code.replace(marker, "tar_path = TAR_PATH").replace(
                    "        ...", "        seen.append((key, caption, meta, jpg_bytes))"
                ),
                ns,
            )
    finally:
        os.chdir(cwd)
    return wds_seen, tar_seen


def test_sample_build_through_cli_reads_back_with_card_snippets(make_spec, tmp_path):
    spec_path = make_spec("cli")
    home = tmp_path / "dagster_home"
    res = run_cli("build", "--spec", str(spec_path), env={"DAGSTER_HOME": str(home)})
    assert res.returncode == 0, res.stderr[-3000:]
    spec = load_spec(spec_path)
    export, work = Path(spec.output_dir), Path(spec.work_dir)

    # The run and its lineage are in the instance at DAGSTER_HOME.
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 1 and runs[0].job_name == "build_export"
        assert instance.get_latest_materialization_event(dg.AssetKey("dataset_card")) is not None
        # Each bucket partition carries its own numbers, not the run's totals; empty ones say so.
        manifest = json.loads((export / "manifest.json").read_text())
        ids = [b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)]
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("bucket_shards"), asset_partitions=ids), limit=1000
        ).records
        by_partition = {r.partition_key: r.asset_materialization.metadata for r in records}
        assert set(by_partition) == set(ids)
        counts = set()
        for bucket_id, md in by_partition.items():
            b = manifest["buckets"].get(bucket_id)
            assert md["samples"].value == (b["count"] if b else 0), bucket_id
            assert md["shards"].value == (len(b["shards"]) if b else 0), bucket_id
            assert md["bytes"].value == (sum(s["bytes"] for s in b["shards"]) if b else 0), bucket_id
            assert md["status"].value.startswith("empty") == (b is None), bucket_id
            counts.add(md["samples"].value)
        assert len(counts) > 2  # different buckets show different numbers
        assert by_partition[ids[0]]["run_samples"].value == manifest["summary"]["samples_exported"]

    res = run_cli("verify", str(export))
    assert res.returncode == 0 and res.stdout.startswith("ok:"), res.stderr

    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["format"] == "bucketed_shards_v1"
    s = manifest["summary"]
    skips = sum(v for k, v in s.items() if k.startswith("skipped_") or k in ("decode_errors", "encode_errors"))
    assert s["images_seen"] == 52 and s["images_seen"] == s["images_exported"] + skips
    for reason in ("decode_errors", "skipped_too_small", "skipped_blank", "skipped_nsfw", "skipped_low_similarity",
                   "skipped_duplicate", "skipped_missing_file"):
        assert s[reason] >= 1, reason

    selected = _selected(work)
    wds_seen, tar_seen = _run_snippets(export)
    total = sum(b["count"] for b in manifest["buckets"].values())
    assert len(wds_seen) == len(tar_seen) == total == s["samples_exported"] > 20
    for jpg, caption, meta in wds_seen:
        assert set(meta) == set(SAMPLE_JSON_KEYS)
        bucket = manifest["buckets"][meta["bucket_id"]]
        assert jpg.size == (bucket["scaled"]["w"], bucket["scaled"]["h"]) == (meta["target_w"], meta["target_h"])
        assert jpg.mode == "RGB"
        text, variant, sel_index, source_id = selected[meta["image_id"]]
        assert caption == text + "\n"
        assert (meta["caption_variant"], meta["caption_selector_index"], meta["caption_source_id"]) == (
            variant, sel_index, source_id)
    for key, caption, meta, jpg_bytes in tar_seen:
        assert "." not in key
        assert caption == selected[meta["image_id"]][0]
        with Image.open(io.BytesIO(jpg_bytes)) as im:
            assert im.size == (meta["target_w"], meta["target_h"])

    # The card reads like the seed card: same sections, real numbers.
    card = (export / "README.md").read_text()
    for heading in ("## Format", "## Image preprocessing", "## Buckets / resolutions", "Bucket distribution:",
                    "## Caption selection (waterfall)", "Caption sources used:", "## Export summary",
                    "## Efficient loading"):
        assert heading in card
    assert f"- images_seen: {s['images_seen']}" in card
    assert "google/gemini-2.0-flash-lite-001" in card

    # Pictures: the chart and one contact sheet per bucket, linked from the card and readable.
    import re

    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", card)
    assert links[0] == "bucket_distribution.png"
    assert sorted(links[1:]) == sorted(f"contact_sheets/{b}.png" for b in manifest["buckets"])
    for link in links:
        with Image.open(export / link) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200, link
    # a sheet shows the bucket's first samples: its top-left tile is the first sample's picture
    bucket_id, bucket = max(manifest["buckets"].items(), key=lambda kv: kv[1]["count"])
    first = next(read_shard(export / bucket["shards"][0]["path"]))[1]["jpg"]
    with Image.open(export / f"contact_sheets/{bucket_id}.png") as sheet, Image.open(io.BytesIO(first)) as im:
        im = im.convert("RGB")
        im.thumbnail((200, 200))
        tile = sheet.convert("RGB").crop((8 + (200 - im.width) // 2, 30 + (200 - im.height) // 2,
                                          8 + (200 - im.width) // 2 + im.width, 30 + (200 - im.height) // 2 + im.height))
        diff = sum(abs(a - b) for a, b in zip(tile.tobytes(), im.tobytes())) / len(im.tobytes())
        assert diff < 3, diff


def test_two_builds_are_byte_identical_and_rebuild_reuses_work(make_spec):
    a, b = make_spec("a"), make_spec("b", **{"image.workers": 2})
    assert materialize_all(a).success
    assert materialize_all(b).success
    ea, eb = Path(load_spec(a).output_dir), Path(load_spec(b).output_dir)
    sa, sb = _shards(ea), _shards(eb)
    assert sa and sa == sb
    ma, mb = (json.loads((e / "manifest.json").read_text()) for e in (ea, eb))
    # The specs differ in paths and worker count only: the manifests differ only in `created`.
    assert ma.pop("created") != mb.pop("created")
    assert ma == mb
    pictures = lambda e: {str(p.relative_to(e)): p.read_bytes() for p in e.rglob("*.png")}  # noqa: E731
    assert pictures(ea) and pictures(ea) == pictures(eb)

    # A second build of the same spec renders nothing and rewrites no shard.
    mtimes = {p: p.stat().st_mtime_ns for p in ea.rglob("shard-*.tar")}
    result = materialize_all(a)
    assert result.success
    mats = {m.asset_key.path[-1]: m for m in result.get_asset_materialization_events()}
    assert mats["processed_images"].materialization.metadata["run_rendered"].value == 0
    # ... and scans no source file again (2 tars, the pcb parquet, the folder, 2 hub parquet files).
    scan = mats["raw_index"].materialization.metadata
    assert (scan["units_scanned"].value, scan["units_reused"].value, scan["units_removed"].value) == (0, 6, 0)
    assert {p: p.stat().st_mtime_ns for p in ea.rglob("shard-*.tar")} == mtimes


@pytest.mark.parametrize(
    "variant,overrides",
    [
        ("multires", {"buckets.base_resolutions": [512, 256]}),
        ("passthrough", {"image.mode": "passthrough_jpeg"}),
        ("center", {"image.crop": {"strategy": "center"}}),
        ("dct", {"image.dct_downscale": True}),
        ("column_rule", {"filters.columns": [{"column": "original_width", "max": 500}]}),
    ],
)
def test_variants_build_and_verify(make_spec, variant, overrides):
    spec_path = make_spec(variant, **overrides)
    result = materialize_all(spec_path)
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    spec = load_spec(spec_path)
    export = Path(spec.output_dir)
    rep = verify_export(export)
    manifest = json.loads((export / "manifest.json").read_text())
    ids = list(manifest["buckets"])
    if variant == "multires":
        assert any(i.startswith("r512_p") for i in ids) and any(i.startswith("r256_p") for i in ids)
        assert all(i.startswith(("r512_p", "r256_p")) for i in ids)
        r256 = [b for i, b in manifest["buckets"].items() if i.startswith("r256_")]
        assert all(b["base_resolution"] == 256 for b in r256)
        # An image that fills a 256 bucket but not a 512 one is exported once (at 256).
        assert manifest["summary"]["samples_exported"] > manifest["summary"]["images_exported"]
    if variant == "passthrough":
        assert manifest["image_mode"] == "passthrough_jpeg"
        assert manifest["summary"]["skipped_passthrough_not_jpeg"] >= 1
        raw_jpegs = {p.stem: p.read_bytes() for p in (Path(spec.sources[1].image_dir)).glob("*.jpg")}
        checked = 0
        for shard in export.rglob("shard-*.tar"):
            for key, parts in read_shard(shard):
                meta = json.loads(parts["json"])
                if meta["image_id"] in raw_jpegs:
                    assert parts["jpg"] == raw_jpegs[meta["image_id"]]
                    checked += 1
        assert checked > 0
        exported = {json.loads(parts["json"])["image_id"] for shard in export.rglob("shard-*.tar")
                    for _, parts in read_shard(shard)}
        assert "000000007" in exported  # the CMYK JPEG passes through too
    if variant == "center":
        assert manifest["preprocessing"]["crop_strategy"] == "center"
    if variant == "dct":
        assert manifest["preprocessing"]["dct_downscale"] is True
        assert "Approximate mode" in (export / "README.md").read_text()
    if variant == "column_rule":
        # LAION json's original_width; the other sources have no such column and pass.
        n = manifest["summary"]["skipped_column_filter"]
        assert n >= 1
        con = duckdb.connect(str(spec.db_path), read_only=True)
        try:
            rows = con.execute("SELECT f.source, f.detail FROM filtered_images f WHERE decision = 'column_filter'").fetchall()
        finally:
            con.close()
        assert len(rows) == n and {r[0] for r in rows} == {"laion"}
        assert all(re.fullmatch(r"original_width \d+(\.0)? > max 500(\.0)?", r[1]) for r in rows), rows
        assert "skipped&#95;column&#95;filter" in (export / "README.md").read_text() or \
            "skipped_column_filter" in (export / "README.md").read_text()
    assert rep.samples == manifest["summary"]["samples_exported"]


def test_one_partition_rewrites_only_its_bucket(make_spec, tmp_path):
    spec_path = make_spec("partition")
    assert materialize_all(spec_path).success
    spec = load_spec(spec_path)
    export = Path(spec.output_dir)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}
    target = sorted(export.glob("buckets/*"))[0].name
    for p in (export / "buckets" / target).glob("*.tar"):
        p.unlink()
    env = {"BUCKET_ASSETS_SPEC": str(spec_path), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    import subprocess
    import sys

    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    res = subprocess.run(
        [dagster, "asset", "materialize", "-m", "bucket_assets.definitions", "--select", "bucket_shards",
         "--partition", target],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # Staged, not yet published: the export still shows what it showed.
    assert not list((export / "buckets" / target).glob("*.tar"))
    assert sorted(p.name for p in (export / ".staging" / "buckets" / target).iterdir())
    res = subprocess.run(
        [dagster, "asset", "materialize", "-m", "bucket_assets.definitions", "--select", "export_manifest"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (export / ".staging").exists()
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}
    assert set(after) == set(before)
    for p, stat in after.items():
        if p.parent.name == target:
            assert stat != before[p]
        else:
            assert stat == before[p], p
    verify_export(export)


def test_build_with_bad_spec_fails_in_one_line(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: x\noutput_dir: o\nwork_dir: w\nsources: [{name: a, kind: folder, path: nowhere}]\nfilters: {bogus: 1}\n")
    res = run_cli("build", "--spec", str(bad), env={"DAGSTER_HOME": str(tmp_path / "h")})
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0
    assert "filters.bogus" in res.stderr


def test_verify_names_the_corrupt_shard(make_spec):
    spec_path = make_spec("corrupt")
    assert materialize_all(spec_path).success
    export = Path(load_spec(spec_path).output_dir)
    shard = sorted(export.rglob("shard-*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = run_cli("verify", str(export))
    assert res.returncode == 1
    assert str(shard.relative_to(export)) in res.stderr


def test_parallel_partition_runs_do_not_fail_on_the_duckdb_lock(make_spec, tmp_path):
    import subprocess
    import sys

    spec_path = make_spec("parallel")
    assert materialize_all(spec_path).success
    export = Path(load_spec(spec_path).output_dir)
    buckets = sorted(p.name for p in export.glob("buckets/*"))[:3]
    home = tmp_path / "home"
    home.mkdir()
    import dagster as dg

    # Create the instance's sqlite storages once: Dagster's own first-time migration is not
    # safe to race (that is the instance, not our DuckDB lock, which is what this test is about).
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs()
    env = {**os.environ, "BUCKET_ASSETS_SPEC": str(spec_path), "DAGSTER_HOME": str(home)}
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    procs = [
        subprocess.Popen(
            [dagster, "asset", "materialize", "-m", "bucket_assets.definitions",
             "--select", "processed_images,bucket_shards", "--partition", b],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for b in buckets
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    # An unpartitioned asset through the same CLI, then the export still verifies.
    res = subprocess.run(
        [dagster, "asset", "materialize", "-m", "bucket_assets.definitions", "--select", "export_manifest"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    verify_export(export)


def test_same_image_id_in_two_sources_fails_naming_both(make_spec, sample_root, tmp_path):
    import shutil

    folder = tmp_path / "dup_folder"
    folder.mkdir()
    shutil.copy(sample_root / "raw" / "pcb" / "train" / "5000.jpg", folder / "5000.jpg")
    spec_path = make_spec("dup")
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["sources"][2]["path"] = str(folder)
    spec_path.write_text(yaml.safe_dump(spec))
    res = run_cli("build", "--spec", str(spec_path), env={"DAGSTER_HOME": str(tmp_path / "h")})
    assert res.returncode == 1
    # The ids are compared once every source is scanned (in SQL), so the scan's progress lines
    # come first; the failure is one line, with no traceback.
    import re

    *progress, line = res.stderr.strip().splitlines()
    assert all(re.fullmatch(r"[a-z_]+: [a-z ]+: \d+/\d+ \(\d+%\)", p) for p in progress), progress
    assert line.startswith("bucket-assets: build failed: raw_index: DuplicateIdError")
    assert "'5000'" in line and "'pcb'" in line and "'folder'" in line


def test_incremental_verification_rereads_only_changed_shards(make_spec):
    spec_path = make_spec("incremental_verify")
    assert materialize_all(spec_path).success
    export = Path(load_spec(spec_path).output_dir)
    full = verify_export(export)
    assert full.reverified == full.shards > 2
    again = verify_export(export, full.verified)
    assert again.reverified == 0 and again.samples == full.samples
    shard = sorted(export.rglob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match=str(shard.relative_to(export))):
        verify_export(export, full.verified)


def test_long_stages_log_progress(make_spec):
    import re

    import dagster as dg

    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(make_spec("progress"), instance)
    assert result.success
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    for stage in ("raw_index: source parts scanned", "processed_images: images rendered", "bucket_shards: buckets written"):
        assert any(re.fullmatch(rf"{stage}: (\d+)/\1 \(100%\), [\d.]+/s in \d+s", m) for m in messages), stage
