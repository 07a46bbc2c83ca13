"""Changing an existing build converges (issue 12, first part): when the bucket set changes
(base resolutions), the next build gives what a clean build of the new spec gives, with no
directory or DB row of a bucket the new spec does not have."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import yaml

from bucket_assets.core.manifest import verify_export
from bucket_assets_tests.conftest import materialize_all


def _shards(export: Path) -> dict[str, bytes]:
    return {str(p.relative_to(export)): p.read_bytes() for p in sorted((export / "buckets").rglob("*")) if p.is_file()}


def _manifest(export: Path) -> dict:
    m = json.loads((export / "manifest.json").read_text())
    m.pop("created")
    return m


def _set_bases(spec: Path, bases: list[int]) -> None:
    d = yaml.safe_load(spec.read_text())
    d.setdefault("buckets", {})["base_resolutions"] = bases
    spec.write_text(yaml.safe_dump(d))


def test_base_resolutions_changed_and_back_converge(make_spec):
    spec = make_spec("existing")
    d = yaml.safe_load(spec.read_text())
    export, work = Path(d["output_dir"]), Path(d["work_dir"])
    assert materialize_all(spec).success
    for bases in ([512, 256], [512]):
        _set_bases(spec, bases)
        assert materialize_all(spec).success
        clean = make_spec(f"clean-{'-'.join(map(str, bases))}", **{"buckets.base_resolutions": bases})
        assert materialize_all(clean).success
        clean_export = Path(yaml.safe_load(clean.read_text())["output_dir"])
        verify_export(export)
        assert _shards(export) == _shards(clean_export)
        assert _manifest(export) == _manifest(clean_export)
        m = _manifest(export)
        assert m["summary"]["samples_exported"] == sum(b["count"] for b in m["buckets"].values())
        assert sorted(p.name for p in (export / "buckets").iterdir()) == sorted(m["buckets"])
        con = duckdb.connect(str(work / "metadata.duckdb"), read_only=True)
        try:
            for t in ("shard_files", "shard_samples", "processed_images"):
                ids = {r[0] for r in con.execute(f"SELECT DISTINCT bucket_id FROM {t}").fetchall()}
                assert all(i.startswith("r") for i in ids) == (len(bases) > 1), (t, sorted(ids)[:3])
        finally:
            con.close()
