"""Killed builds resume cleanly; a failing write keeps the previous export.

Each case runs `bucket-assets build` in its own session, kills the whole process group with
SIGKILL at one point (a named failpoint, or a seeded random moment), then reruns it and checks:
the rerun succeeds, the export verifies, shards and manifest equal an uninterrupted build's
(apart from `created`), no temp file is left, nothing half-written was ever visible under a
final name, and samples already rendered and recorded are not rendered again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bucket_assets.core.atomic import TMP_PREFIX
from bucket_assets.core.manifest import VOLATILE_FIELDS, verify_export
from bucket_assets.core.processing import JOURNAL_NAME, read_journal
from bucket_assets.core.shards import read_shard
from bucket_assets_tests.conftest import spec_dict, unwritable_dir

# (case id, failpoint). Together they cover every stage, the DB commits, a store file, a shard
# and the manifest and card half written.
KILL_POINTS = [
    ("mid-scan", "kill:scan@7", False),
    ("raw-index-commit", "kill:db_commit=raw_index", False),
    ("assignment-commit", "kill:db_commit=bucket_assignments", False),
    ("caption-table-commit", "kill:db_commit=captions", False),
    ("selection-commit", "kill:db_commit=selected_captions", False),
    ("mid-render", "kill:rendered@12", True),
    ("mid-store-file", "kill:write_half=STORE_KEY", True),
    ("processed-commit", "kill:db_commit=processed_images", True),
    ("mid-shard", "kill:shard_sample@9", True),
    ("before-shard-rename", "kill:write=shard-000000.tar@2", True),
    ("shard-files-commit", "kill:db_commit=shard_files", True),
    ("mid-publish", "kill:publish@2", True),
    ("mid-manifest", "kill:write_half=manifest.json", True),
    ("mid-card", "kill:write_half=README.md", True),
]
RANDOM_KILLS = 2
SEED = 20261125


def _spec(sample_root: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(sample_root, out, **{"image.workers": 2})))
    return path


def _start(spec: Path, failpoint: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(spec.parent / "dagster_home")}
    env.pop("BUCKET_ASSETS_FAILPOINT", None)
    if failpoint:
        env["BUCKET_ASSETS_FAILPOINT"] = failpoint
    Path(env["DAGSTER_HOME"]).mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "bucket_assets.cli", "build", "--spec", str(spec)]
    # Own session: the failpoint's killpg reaches the build and its workers, not pytest.
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # orphaned pool workers, if any
    except ProcessLookupError:
        pass
    return proc.returncode, out


def _build(spec: Path) -> None:
    rc, out = _finish(_start(spec))
    assert rc == 0, out


def _shards(export: Path) -> dict[str, bytes]:
    return {str(p.relative_to(export)): p.read_bytes() for p in sorted(export.rglob("shard-*.tar"))}


def _manifest(export: Path) -> dict:
    m = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    return {k: v for k, v in m.items() if k not in VOLATILE_FIELDS}


def _card(export: Path) -> str:
    """The card with the manifest's `created` (its one volatile field) masked."""
    created = json.loads((export / "manifest.json").read_text(encoding="utf-8"))["created"]
    return (export / "README.md").read_text(encoding="utf-8").replace(created, "<created>")


def _committed(work: Path) -> dict[str, tuple[str, int]]:
    """bucket/key -> (pack, offset) of every stored record the DB holds."""
    db = work / "metadata.duckdb"
    if not db.exists():
        return {}
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'processed_images'").fetchone()[0]:
            return {}
        rows = con.execute(
            "SELECT bucket_id, key, path, pack_offset FROM processed_images WHERE status = 'ok'"
        ).fetchall()
    finally:
        con.close()
    return {f"{b}/{k}": (p, o) for b, k, p, o in rows}


def _journaled(work: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for j in (work / "processed").glob(f"*/{JOURNAL_NAME}") if (work / "processed").is_dir() else []:
        for key, row in read_journal(j).items():
            if row["status"] == "ok":
                out[f"{j.parent.name}/{key}"] = (row["path"], row["pack_offset"])
    return out


def _store(work: Path) -> dict[str, tuple[str, int]]:
    """Every stored record a rerun may reuse: committed rows, overridden by journaled ones."""
    return {**_committed(work), **_journaled(work)}


def _recorded(work: Path) -> set[str] | None:
    """Samples a rerun must reuse: those in journals, or all when the DB holds them
    (no journal left: processed_images committed). None before any rendering."""
    journaled = _journaled(work)
    if journaled:
        return set(journaled)
    return set(_committed(work)) or None


def _assert_nothing_partial_visible(export: Path) -> None:
    """What a reader can see under final names is whole: every shard a valid tar of complete
    samples, the manifest valid JSON."""
    if not export.is_dir():
        return
    for p in export.rglob("*.tar"):
        for _key, parts in read_shard(p):
            assert set(parts) == {"jpg", "txt", "json"}, p
    if (export / "manifest.json").exists():
        json.loads((export / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    spec = _spec(sample_root, out)
    _build(spec)
    export = out / "export"
    keys = sorted(_store(out / "work"))
    return {"shards": _shards(export), "manifest": _manifest(export), "card": _card(export),
            "store_key": keys[min(10, len(keys) - 1)].split("/")[-1] + ".jpg", "stored": len(keys)}


def _check_resume(sample_root: Path, out: Path, reference: dict, failpoint: str | None, delay: float | None,
                  rendered_before: bool = False) -> None:
    spec = _spec(sample_root, out)
    export, work = out / "export", out / "work"
    proc = _start(spec, failpoint)
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    rc, log = _finish(proc)
    assert rc == -signal.SIGKILL, f"the build was not killed (rc {rc}):\n{log}"
    _assert_nothing_partial_visible(export)
    before = _store(work)
    recorded = _recorded(work)
    if rendered_before:
        assert recorded, "the kill came after rendering began, yet no rendered sample is recorded"

    rc, log = _finish(_start(spec))
    assert rc == 0, log
    verify_export(export)
    assert _shards(export) == reference["shards"]
    assert _manifest(export) == reference["manifest"]
    assert _card(export) == reference["card"]
    leftovers = [p for root in (export, work) for p in root.rglob(f"{TMP_PREFIX}*")]
    assert leftovers == []
    assert not list((work / "processed").glob(f"*/{JOURNAL_NAME}"))

    after = _store(work)
    assert len(after) == reference["stored"]
    # Packs a kill left behind (half-written tails, unreferenced packs) are pruned by the rerun.
    assert {str(p) for p in (work / "processed").rglob("*") if p.is_file()} == {p for p, _ in after.values()}
    rerendered = {k for k, loc in after.items() if before.get(k) != loc}
    if recorded:
        # Every sample recorded as rendered is reused: the same record in the same pack.
        assert not (rerendered & recorded), sorted(rerendered & recorded)[:5]
        assert len(rerendered) <= reference["stored"] - len(recorded)


@pytest.mark.parametrize("case,failpoint,rendered_before", KILL_POINTS, ids=[c for c, _, _ in KILL_POINTS])
def test_killed_build_resumes(sample_root, tmp_path, reference, case, failpoint, rendered_before):
    _check_resume(sample_root, tmp_path, reference, failpoint.replace("STORE_KEY", reference["store_key"]), None,
                  rendered_before)


@pytest.mark.parametrize("n", range(RANDOM_KILLS))
def test_killed_at_a_random_moment_resumes(sample_root, tmp_path, reference, n):
    delay = random.Random(SEED + n).uniform(2.0, 6.0)
    _check_resume(sample_root, tmp_path, reference, None, delay)


def _previous_export(sample_root: Path, out: Path) -> tuple[Path, Path, dict, bytes]:
    """A built export, then a spec change (smaller shards) so the next build rewrites them all."""
    spec = _spec(sample_root, out)
    _build(spec)
    export = out / "export"
    d = yaml.safe_load(spec.read_text())
    d["shards"]["max_samples"] = 3
    spec.write_text(yaml.safe_dump(d))
    return spec, export, _shards(export), (export / "manifest.json").read_bytes()


def _assert_intact(export: Path, shards: dict, manifest: bytes) -> None:
    assert _shards(export) == shards
    assert (export / "manifest.json").read_bytes() == manifest
    verify_export(export)
    assert not [p for p in export.rglob(f"{TMP_PREFIX}*")]


@pytest.mark.parametrize("failpoint,step", [
    ("enospc:write=shard-000001.tar", "bucket_shards"),
    ("enospc:write=manifest.json", "export_manifest"),
])
def test_full_disk_fails_clearly_and_keeps_the_previous_export(sample_root, tmp_path, failpoint, step):
    spec, export, shards, manifest = _previous_export(sample_root, tmp_path)
    rc, log = _finish(_start(spec, failpoint))
    assert rc == 1, log
    assert f"build failed: {step}" in log and "No space left on device" in log, log
    _assert_intact(export, shards, manifest)
    _build(spec)  # room again: the build completes with the new shards
    verify_export(export)
    assert _shards(export) != shards


def test_unwritable_output_fails_clearly_and_keeps_the_previous_export(sample_root, tmp_path):
    spec, export, shards, manifest = _previous_export(sample_root, tmp_path)
    with unwritable_dir(export):
        rc, log = _finish(_start(spec))
    assert rc == 1, log
    assert "build failed: bucket_shards" in log and ("Permission denied" in log or "Operation not permitted" in log), log
    _assert_intact(export, shards, manifest)


def _scan_parts(work: Path) -> dict[str, tuple[int, int, int, int]]:
    """Committed scan-cache parts: summary path -> inode and mtime of it and of its fragment."""
    out = {}
    for j in sorted((work / "scan").rglob("*.json")) if (work / "scan").is_dir() else []:
        frag, js = j.with_suffix(".parquet").stat(), j.stat()
        out[str(j.relative_to(work))] = (js.st_ino, js.st_mtime_ns, frag.st_ino, frag.st_mtime_ns)
    return out


def test_kill_during_a_file_scan_resumes_without_rescanning_finished_units(sample_root, tmp_path, reference):
    """SIGKILL at the 3rd record of the folder source (the last unit; two pool workers): the
    units committed before it are reused as they are (same files), the rest is scanned, and the
    export equals an uninterrupted build's."""
    spec = _spec(sample_root, tmp_path)
    work = tmp_path / "work"
    rc, log = _finish(_start(spec, "kill:scan=folder@3"))
    assert rc == -signal.SIGKILL, f"the build was not killed (rc {rc}):\n{log}"
    before = _scan_parts(work)
    assert before, "no unit was committed before the kill"
    assert not [k for k in before if k.startswith("scan/folder/")]  # killed mid-scan: not committed

    rc, log = _finish(_start(spec))
    assert rc == 0, log
    after = _scan_parts(work)
    assert {k: after.get(k) for k in before} == before  # not scanned again
    assert len(after) == 6 and [k for k in after if k.startswith("scan/folder/")]  # 2 tars, pcb, folder, 2 hub files
    export = tmp_path / "export"
    verify_export(export)
    assert _shards(export) == reference["shards"]
    assert _manifest(export) == reference["manifest"]
    assert [p for p in work.rglob(f"{TMP_PREFIX}*")] == []
