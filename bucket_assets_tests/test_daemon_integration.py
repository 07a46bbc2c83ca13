"""With real processes: `dg dev` (webserver + daemon) keeps an export fresh when a caption
source lands, rewriting only the bucket whose captions changed."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bucket_assets.core.manifest import verify_export
from bucket_assets.core.shards import read_shard
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import dagster_dev, free_port, listening_addresses, run_cli, wait_for

NEW_MODEL = "google/gemini-2.5-flash-lite"


def _captions(shard_dir: Path) -> dict[str, str]:
    out = {}
    for shard in sorted(shard_dir.glob("shard-*.tar")):
        for key, parts in read_shard(shard):
            out[key] = parts["txt"].decode()
    return out


def test_dagster_dev_reshards_one_bucket_when_a_caption_source_lands(make_spec, sample_root, tmp_path):
    import shutil

    landing = tmp_path / "landing"
    shutil.copytree(sample_root / "captions", landing)
    spec_path = make_spec("daemon", **{"captions.landing_dir": str(landing)})
    spec = load_spec(spec_path)
    export = Path(spec.output_dir)
    home = tmp_path / "dagster_home"
    env = {"DAGSTER_HOME": str(home), "BUCKET_ASSETS_SPEC": str(spec_path)}
    res = run_cli("build", "--spec", str(spec_path), env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]

    con = duckdb.connect(str(spec.db_path), read_only=True)
    rows = con.execute("SELECT bucket_id, image_id FROM shard_samples").fetchall()
    con.close()
    by_bucket: dict[str, list[str]] = {}
    for b, i in rows:
        by_bucket.setdefault(b, []).append(i)
    target = max(sorted(by_bucket), key=lambda b: len(by_bucket[b]))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}
    captions_before = _captions(export / "buckets" / target)

    port = free_port()
    with dagster_dev(tmp_path, env, port) as proc:
        # The README's command binds the webserver to loopback only.
        assert "dg dev -h 127.0.0.1" in (Path(__file__).resolve().parents[1] / "README.md").read_text()
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {"0100007F"}, listening_addresses(port)
        ids = sorted(by_bucket[target])
        pq.write_table(pa.table({"image_id": ids, "caption": [f"A new caption for {i}." for i in ids]}),
                       landing / "gemini_v2.parquet")
        (landing / "gemini_v2.json").write_text(json.dumps({
            "variant": "caption_gemini_2_flash_lite", "backend": "openrouter", "model": NEW_MODEL,
            "created_at": 1790000000, "system_prompt_sha256": "a" * 64, "user_prompt_sha256": "b" * 64,
        }))

        def manifest_updated() -> bool:
            try:
                m = json.loads((export / "manifest.json").read_text())
            except (OSError, json.JSONDecodeError):
                return False
            return NEW_MODEL in [s["model"] for s in m["caption_sources"]] and NEW_MODEL in (export / "README.md").read_text()

        wait_for(manifest_updated, 180, "the manifest to list the new caption source", proc)

    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}
    assert set(after) == set(before)
    for p in after:
        if p.parent.name != target:
            assert after[p] == before[p], f"{p} was rewritten"
    captions_after = _captions(export / "buckets" / target)
    assert captions_after.keys() == captions_before.keys()
    assert all(v.startswith("A new caption for ") for v in captions_after.values())
    assert captions_after != captions_before
    verify_export(export)
