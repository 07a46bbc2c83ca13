"""The output dir holds the user's files too (issue 11): a build writes only into a directory
that is new, empty or an export of ours, removes only files of its own making, replaces a
corrupt manifest, and a no-op rebuild writes nothing (so it works on a read-only export)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bucket_assets.core.manifest import verify_export
from bucket_assets.core.publish import MARKER, output_dir_problem
from bucket_assets_tests.conftest import materialize_all, run_cli, unwritable_dir

USER_FILES = {
    "buckets/family/photo.jpg": b"my holiday",
    "contact_sheets/mine.png": b"my picture",
    ".tmp-keepme": b"keep me",
    "README.md": b"# my notes\n",
}


def _plant(root: Path, files: dict[str, bytes]) -> dict[str, tuple[bytes, int]]:
    out = {}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = (data, p.stat().st_mtime_ns)
    return out


def _intact(root: Path, planted: dict[str, tuple[bytes, int]]) -> None:
    for rel, (data, mtime) in planted.items():
        p = root / rel
        assert p.is_file() and p.read_bytes() == data and p.stat().st_mtime_ns == mtime, rel


def test_a_non_empty_dir_that_is_not_an_export_is_refused_before_any_work(make_spec, tmp_path):
    spec = make_spec("user")
    export = Path(yaml.safe_load(spec.read_text())["output_dir"])
    planted = _plant(export, USER_FILES)
    r = run_cli("build", "--spec", str(spec), env={"DAGSTER_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "is not empty and holds no bucket_assets export" in line, line
    _intact(export, planted)
    assert sorted(p.name for p in export.iterdir()) == sorted({".tmp-keepme", "README.md", "buckets", "contact_sheets"})
    assert not (Path(yaml.safe_load(spec.read_text())["work_dir"]) / "metadata.duckdb").exists()
    # A manifest of someone else's format does not make it ours either.
    (export / "manifest.json").write_text(json.dumps({"format": "other"}))
    assert "holds no bucket_assets export" in output_dir_problem(export)
    # An existing file as output_dir.
    f = tmp_path / "afile"
    f.write_text("x")
    assert "is not a directory" in output_dir_problem(f)


def test_an_export_of_ours_keeps_the_users_other_files(make_spec):
    spec = make_spec("ours")
    assert materialize_all(spec).success
    d = yaml.safe_load(spec.read_text())
    export = Path(d["output_dir"])
    assert (export / MARKER).is_file()
    planted = _plant(export, {k: v for k, v in USER_FILES.items() if not k.startswith("buckets/")}
                     | {"contact_sheets/notes.txt": b"n", "extra/keep.bin": b"k"})
    planted.pop("README.md")  # the card is ours to rewrite
    # A change that rewrites every shard, the card and the sheets.
    d["shards"]["max_samples"] = 2
    spec.write_text(yaml.safe_dump(d))
    assert materialize_all(spec).success
    verify_export(export)
    _intact(export, planted)


def test_a_corrupt_manifest_in_our_export_is_replaced(make_spec):
    spec = make_spec("corrupt")
    assert materialize_all(spec).success
    export = Path(yaml.safe_load(spec.read_text())["output_dir"])
    (export / "manifest.json").write_text("{ not json")
    assert output_dir_problem(export) is None  # the marker says it is ours
    assert materialize_all(spec).success
    verify_export(export)
    # An export from before the marker existed (manifest only) is ours too.
    (export / MARKER).unlink()
    assert output_dir_problem(export) is None


def test_a_no_op_rebuild_writes_nothing_into_the_export(make_spec):
    spec = make_spec("noop")
    assert materialize_all(spec).success
    export = Path(yaml.safe_load(spec.read_text())["output_dir"])
    before = {p: p.stat().st_mtime_ns for p in export.rglob("*")}
    with unwritable_dir(export):
        assert materialize_all(spec).success
    assert {p: p.stat().st_mtime_ns for p in export.rglob("*")} == before


def test_a_foreign_file_in_a_bucket_dir_is_kept_and_the_failure_names_it(make_spec, tmp_path):
    spec = make_spec("foreign")
    env = {"DAGSTER_HOME": str(tmp_path / "home")}
    assert run_cli("build", "--spec", str(spec), env=env).returncode == 0
    export = Path(yaml.safe_load(spec.read_text())["output_dir"])
    bucket = sorted((export / "buckets").iterdir())[0]
    (bucket / "notes.txt").write_text("mine")
    r = run_cli("build", "--spec", str(spec), env=env)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]  # progress lines come before it
    assert line.startswith("bucket-assets: build failed: "), r.stderr
    # The failure line carries the check's own message, not only "1 blocking asset check failed".
    assert f"export_verifies: buckets/{bucket.name}/notes.txt: file not listed in the manifest" in line, line
    assert (bucket / "notes.txt").read_text() == "mine"
