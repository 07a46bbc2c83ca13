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
        # The processed-image store keeps no directory of a bucket the spec no longer has.
        store = {p.name for p in (work / "processed").iterdir() if p.is_dir()}
        assert store and all(i.startswith("r") for i in store) == (len(bases) > 1), sorted(store)[:3]
        con = duckdb.connect(str(work / "metadata.duckdb"), read_only=True)
        try:
            for t in ("shard_files", "shard_samples", "processed_images"):
                ids = {r[0] for r in con.execute(f"SELECT DISTINCT bucket_id FROM {t}").fetchall()}
                assert all(i.startswith("r") for i in ids) == (len(bases) > 1), (t, sorted(ids)[:3])
        finally:
            con.close()


def _edit(d: dict, change: str) -> None:
    """One spec change of the matrix, applied to spec dict `d` in place."""
    if change == "divisible":
        d["buckets"]["divisible"] = 64
    elif change == "crop_center":
        d["image"]["crop"] = {"strategy": "center"}
    elif change == "passthrough":
        d["image"]["mode"] = "passthrough_jpeg"
    elif change == "reencode":
        d["image"]["mode"] = "reencode_jpeg"
    elif change == "quality":
        d["image"]["jpeg"]["quality"] = 80
    elif change == "shard_size":
        d["shards"]["max_samples"] = 2
    elif change == "source_removed":
        d["sources"] = [s for s in d["sources"] if s["kind"] != "folder"]
    elif change == "selectors_reordered":
        sel = d["captions"]["selectors"]
        d["captions"]["selectors"] = [sel[1], sel[0], *sel[2:]]
    else:
        raise AssertionError(change)


# Applied one after another to the same work dir and export; after each, the export equals a
# clean build of the spec reached so far. `reencode` returns to the spec of `crop_center`.
CHAIN = ["divisible", "crop_center", "passthrough", "reencode", "quality", "shard_size", "source_removed",
         "selectors_reordered"]
# Changes that must not render any image again (the stored JPEGs are still right). The store
# keeps the current rendering of each sample only, so passthrough -> reencode renders again.
NO_RENDER = {"shard_size", "source_removed", "selectors_reordered"}


def _rendered(result) -> int:
    mats = [m for m in result.get_asset_materialization_events() if m.asset_key.path[-1] == "processed_images"]
    return mats[0].materialization.metadata["run_rendered"].value


def _db_buckets(work: Path) -> dict[str, set[str]]:
    con = duckdb.connect(str(work / "metadata.duckdb"), read_only=True)
    try:
        return {t: {r[0] for r in con.execute(f"SELECT DISTINCT bucket_id FROM {t}").fetchall()}
                for t in ("bucket_assignments", "processed_images", "shard_files", "shard_samples")}
    finally:
        con.close()


def test_change_matrix_converges_to_clean_builds(make_spec):
    from bucket_assets.core.buckets import bucket_table
    from bucket_assets.spec import load_spec

    spec = make_spec("chain")
    d = yaml.safe_load(spec.read_text())
    export, work = Path(d["output_dir"]), Path(d["work_dir"])
    assert materialize_all(spec).success
    clean_of: dict[str, Path] = {}
    state = dict(d)
    for change in CHAIN:
        state = yaml.safe_load(yaml.safe_dump(state))
        _edit(state, change)
        spec.write_text(yaml.safe_dump(state))
        result = materialize_all(spec)
        assert result.success, change
        if change in NO_RENDER:
            assert _rendered(result) == 0, change
        # The clean build of the same spec (other paths), reused when the chain returns to a spec.
        key = yaml.safe_dump({k: v for k, v in state.items() if k not in ("output_dir", "work_dir")})
        if key not in clean_of:
            clean = make_spec(f"clean-{change}")
            cd = {**state, "output_dir": yaml.safe_load(clean.read_text())["output_dir"],
                  "work_dir": yaml.safe_load(clean.read_text())["work_dir"]}
            clean.write_text(yaml.safe_dump(cd))
            assert materialize_all(clean).success, change
            clean_of[key] = Path(cd["output_dir"])
        clean_export = clean_of[key]
        verify_export(export)
        assert _shards(export) == _shards(clean_export), change
        assert _manifest(export) == _manifest(clean_export), change
        card = lambda e: (e / "README.md").read_text().replace(  # noqa: E731
            json.loads((e / "manifest.json").read_text())["created"], "<created>")
        assert card(export) == card(clean_export), change
        pictures = lambda e: {str(p.relative_to(e)): p.read_bytes() for p in e.rglob("*.png")}  # noqa: E731
        assert pictures(export) == pictures(clean_export), change
        # Nothing of a bucket the spec does not have: DB rows, store dirs, export dirs.
        s = load_spec(spec)
        ids = {b.id for b in bucket_table(s.buckets.base_resolutions, s.buckets.divisible)}
        for table, found in _db_buckets(work).items():
            assert found <= ids, (change, table, sorted(found - ids)[:3])
        store = work / "processed"
        if store.is_dir():
            assert {p.name for p in store.iterdir() if p.is_dir()} <= ids, change
        assert {p.name for p in (export / "buckets").iterdir()} == set(_manifest(export)["buckets"]), change
    assert len(clean_of) == len(CHAIN) - 1
