"""The project through `dg` (dagster-dg-cli), as the README runs it: `dg check defs`, `dg launch`
of a selection and of one bucket partition, and `dg dev` over the project's own instance layout
(DAGSTER_HOME = the project root, storage in .dagster_home/), all without Dagster's
SupersessionWarnings or its "dagster.yaml in the current folder" warning. Also the instance
`bucket-assets build` picks (cli.ensure_dagster_home)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

import dagster as dg

from bucket_assets import cli
from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import REPO, free_port, wait_for

DG = os.path.join(os.path.dirname(sys.executable), "dg")
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'  # one process: seconds, not one per step

# What must never be printed: Python warnings (SupersessionWarning & co. print as
# "<file>:<line>: SupersessionWarning: ..."), Dagster's notes on a misplaced or missing instance
# config, dg's venv and telemetry notices.
NOISE = [
    re.compile(r"\w+Warning: "),
    re.compile(r"found a dagster instance configuration value", re.I),
    re.compile(r"no dagster instance configuration file", re.I),
    re.compile(r"active virtual environment does not match"),
    re.compile(r"we collect usage statistics"),
]


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(p.search(line) for p in NOISE)]


def _seeded_home(path: Path, monkeypatch) -> Path:
    """A DAGSTER_HOME seeded the way `bucket-assets build` seeds one, from the project root."""
    monkeypatch.setenv("DAGSTER_HOME", str(path))
    monkeypatch.chdir(REPO)
    return cli.ensure_dagster_home()


def _dg(*args: str, env: dict, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([DG, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **env},
                         timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"dg {' '.join(args)} exited {res.returncode}:\n{out[-4000:]}"
    assert not _noise(out), _noise(out)
    return res


def test_dg_check_defs_and_launch_a_selection_then_one_bucket_partition(make_spec, tmp_path, monkeypatch):
    spec_path = make_spec("dg")
    spec = load_spec(spec_path)
    home = _seeded_home(tmp_path / "home", monkeypatch)
    env = {"DAGSTER_HOME": str(home), "BUCKET_ASSETS_SPEC": str(spec_path)}

    checked = _dg("check", "defs", env=env)
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    _dg("launch", "--assets", "url_downloads,raw_index,filtered_images,bucket_assignments,caption_table,selected_captions",
        "--config-json", IN_PROCESS, env=env)
    with duckdb.connect(str(spec.db_path), read_only=True) as con:
        bucket, planned = con.execute(
            "SELECT bucket_id, count(*) FROM bucket_assignments WHERE status = 'ok' "
            "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1").fetchone()

    _dg("launch", "--assets", "processed_images,bucket_shards", "--partition", bucket, "--config-json", IN_PROCESS, env=env)
    with duckdb.connect(str(spec.db_path), read_only=True) as con:
        sharded = con.execute("SELECT count(*) FROM shard_samples WHERE bucket_id = ?", [bucket]).fetchone()[0]
    assert 0 < sharded <= planned

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.is_success for r in runs), [(r.run_id, r.status) for r in runs]
        assert runs[0].tags.get("dagster/partition") == bucket
        for asset in ("processed_images", "bucket_shards"):
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[bucket]), limit=10).records
            assert len(records) == 1, asset
            md = records[0].asset_materialization.metadata
            # the partition's own numbers
            assert md["samples"].value == (planned if asset == "processed_images" else sharded), (asset, md)
        # the build's instance lives in its home: nothing was written into the project root
        assert (home / "history" / "runs.db").is_file()
    assert not list(REPO.glob(".tmp_dagster_home_*"))


def _project_copy(root: Path) -> Path:
    """This project's dg/instance layout (pyproject.toml, dagster.yaml; the package itself is the
    installed one) in `root`, so `dg dev` runs there as in a checkout without touching this
    checkout's own .dagster_home."""
    root.mkdir()
    for name in ("pyproject.toml", "dagster.yaml"):
        shutil.copy(REPO / name, root / name)
    (root / "bucket_assets").symlink_to(REPO / "bucket_assets", target_is_directory=True)
    return root


def test_readme_ui_command_starts_without_warnings_and_shows_the_cli_build(make_spec, tmp_path):
    import signal
    import urllib.request

    readme = (REPO / "README.md").read_text()
    ui = "DAGSTER_HOME=$PWD .venv/bin/dg dev -h 127.0.0.1 -p 3000"
    assert ui in readme
    project = _project_copy(tmp_path / "project")
    spec_path = make_spec("ui_layout")
    env = {**os.environ, "BUCKET_ASSETS_SPEC": str(spec_path)}
    env.pop("DAGSTER_HOME", None)

    # `bucket-assets build` in the project root, no DAGSTER_HOME: the project's instance.
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "bucket-assets"), "build"],
                         capture_output=True, text=True, cwd=project, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"DAGSTER_HOME={project})" in res.stdout, res.stdout
    assert (project / ".dagster_home" / "history" / "runs.db").is_file()
    assert not (project / ".dagster_home" / "dagster.yaml").exists()  # one config: ./dagster.yaml

    # The README's UI command, with its DAGSTER_HOME=$PWD, from the project root.
    port = free_port()
    log_path = tmp_path / "dg_dev.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([DG, "dev", "-h", "127.0.0.1", "-p", str(port)], cwd=project,
                                env={**env, "DAGSTER_HOME": str(project)}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            def up() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False

            wait_for(up, 120, "the webserver", proc)
            import json

            query = "{ runsOrError { ... on Runs { results { runId jobName status } } } }"
            req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                runs = json.loads(r.read())["data"]["runsOrError"]["results"]
            # the UI shows the CLI's build
            assert [(r["jobName"], r["status"]) for r in runs] == [("build_export", "SUCCESS")], runs
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = log_path.read_text()
    assert "Serving dagster-webserver" in out, out[-3000:]
    assert not _noise(out), _noise(out)
    # the instance's files are all under .dagster_home/, beside the build's instance lock and the
    # two empty directories Dagster's telemetry uploader makes in DAGSTER_HOME (all git-ignored)
    assert sorted(p.name for p in project.iterdir()) == [
        ".bucket_assets-instance.lock", ".dagster_home", ".logs_queue", "bucket_assets", "dagster.yaml", "logs",
        "pyproject.toml"]
    assert not list((project / "logs").iterdir()) and not list((project / ".logs_queue").iterdir())
    # (directories named with their slash: the checkout may have none of them)
    left = [".bucket_assets-instance.lock", ".dagster_home/", ".logs_queue/", "logs/"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *left], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == left, ignored


# --- which instance `bucket-assets build` records in -------------------------------------------


def test_build_in_the_project_root_uses_the_project_instance(tmp_path, monkeypatch):
    project = _project_copy(tmp_path / "project")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(project)
    assert cli.ensure_dagster_home() == project and os.environ["DAGSTER_HOME"] == str(project)
    with dg.DagsterInstance.get() as instance:
        instance.get_runs()
        assert instance.get_settings("telemetry") == {"enabled": False}
        assert instance.get_settings("nux") == {"enabled": False}
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
    assert (project / ".dagster_home" / "history" / "runs.db").is_file()
    assert not (project / "history").exists()


@pytest.mark.parametrize("cwd_has_project_yaml", [True, False])
def test_a_new_dagster_home_gets_the_settings_not_the_storage_paths(tmp_path, monkeypatch, cwd_has_project_yaml):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if cwd_has_project_yaml:
        shutil.copy(REPO / "dagster.yaml", cwd / "dagster.yaml")
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli.ensure_dagster_home() == home
    seeded = yaml.safe_load((home / "dagster.yaml").read_text())
    project = yaml.safe_load((REPO / "dagster.yaml").read_text())
    assert seeded == {k: v for k, v in project.items() if k not in cli._STORAGE_KEYS}
    assert {"telemetry", "nux", "run_queue"} <= set(seeded)
    with dg.DagsterInstance.get() as instance:
        instance.get_runs()
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
    assert (home / "history" / "runs.db").is_file()
    assert not (cwd / ".dagster_home").exists()


def test_the_project_instance_from_another_directory_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    project = _project_copy(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(project))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit) as exc:
        cli.ensure_dagster_home()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run bucket-assets build in" in err, err
    assert not (elsewhere / ".dagster_home").exists()
