"""Concurrent builds of one spec: one builds, any other refuses at once with one line (the build
lock, core/buildlock.py); a killed holder never leaves a stale lock; runs from the UI/daemon are
queued one at a time per code location; matplotlib never writes under $HOME."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bucket_assets.spec import load_spec
from bucket_assets_tests.conftest import REPO, run_cli

REFUSAL = re.compile(r"bucket-assets: another build of this spec is running \(pid (\d+); lock (.+)\)")

HOLDER = """
import sys
from bucket_assets.core.buildlock import BuildLock
lock = BuildLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _holder(work_dir: Path) -> subprocess.Popen:
    """A python process holding the build lock of `work_dir` until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def _no_mpl_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    return {**env, **extra}


# --- the lock itself ---------------------------------------------------------------------------


def test_lock_creates_work_dir_and_refuses_a_second_holder_naming_the_first(tmp_path):
    from bucket_assets.core.buildlock import BuildLock, BuildLockBusy

    work = tmp_path / "not" / "yet" / "work"
    with BuildLock(work) as lock:
        assert lock.path == work / ".build.lock" and lock.path.is_file()
        # flock is per open file: a second lock on the same dir conflicts even in one process.
        with pytest.raises(BuildLockBusy) as exc:
            BuildLock(work).acquire()
        assert exc.value.pid == os.getpid()
        assert str(exc.value) == f"another build of this spec is running (pid {os.getpid()}; lock {work}/.build.lock)"
    with BuildLock(work):  # released on exit
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    from bucket_assets.core.buildlock import BuildLock, BuildLockBusy

    work = tmp_path / "work"
    holder = _holder(work)
    try:
        with pytest.raises(BuildLockBusy) as exc:
            BuildLock(work).acquire()
        assert exc.value.pid == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    # The file (with the dead pid in it) is still there; the lock is not.
    assert (work / ".build.lock").read_text().strip() == str(holder.pid)
    with BuildLock(work) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


# --- bucket-assets build -----------------------------------------------------------------------


def test_build_refuses_at_once_while_another_process_holds_the_lock(make_spec, tmp_path):
    spec_path = make_spec("held")
    spec = load_spec(spec_path)
    work = Path(spec.work_dir)
    home = tmp_path / "held_home"  # must not be created: refusal comes before the instance
    env = {"DAGSTER_HOME": str(home), "BUCKET_ASSETS_SPEC": str(spec_path)}

    def cpu_of(fn):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        res = fn()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return res, cpu, time.monotonic() - t0

    # What the CLI costs before it can know the work dir: the interpreter and its imports.
    imports = [sys.executable, "-c", "import bucket_assets.cli, bucket_assets.definitions"]
    base, base_cpu, base_wall = cpu_of(
        lambda: subprocess.run(imports, capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path)
    )
    assert base.returncode == 0, base.stderr

    holder = _holder(work)
    try:
        res, cpu, wall = cpu_of(lambda: run_cli("build", "--spec", str(spec_path), env=env, cwd=tmp_path))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stderr == f"bucket-assets: another build of this spec is running (pid {holder.pid}; lock {work}/.build.lock)\n"
    assert res.stdout == ""
    # Its own work beyond the imports is well under a second (CPU time: robust on a busy machine).
    assert cpu - base_cpu < 0.5, f"refusal took {cpu:.2f}s CPU vs {base_cpu:.2f}s for the imports alone ({wall:.1f}s vs {base_wall:.1f}s wall)"
    # Nothing was touched: no Dagster instance, no output dir, nothing in the work dir but the lock.
    assert not home.exists()
    assert not Path(spec.output_dir).exists()
    assert sorted(p.name for p in work.iterdir()) == [".build.lock"]


def test_two_builds_at_once_with_a_fresh_dagster_home_one_builds_one_refuses(make_spec, tmp_path):
    spec_path = make_spec("race")
    spec = load_spec(spec_path)
    home = tmp_path / "fresh_dagster_home"
    user_home = tmp_path / "user_home"
    user_home.mkdir()
    assert not home.exists()
    env = {**_no_mpl_env(HOME=str(user_home)), "DAGSTER_HOME": str(home)}
    # The project's dagster.yaml in the cwd seeds the new home (as in the README's commands).
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "dagster.yaml").write_bytes((REPO / "dagster.yaml").read_bytes())

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_cli, "build", "--spec", str(spec_path), env=env, cwd=cwd) for _ in range(2)]
        results = [f.result() for f in futures]

    for r in results:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [(r.returncode, r.stderr[-1500:]) for r in results]
    built = next(r for r in results if r.returncode == 0)
    refused = next(r for r in results if r.returncode == 1)
    m = REFUSAL.fullmatch(refused.stderr.rstrip("\n"))
    assert m and refused.stderr.count("\n") == 1, refused.stderr
    assert m.group(2) == f"{spec.work_dir}/.build.lock"
    assert refused.stdout == ""
    assert built.stdout.startswith(f"built {spec.output_dir} ")

    ver = run_cli("verify", spec.output_dir)
    assert ver.returncode == 0, ver.stderr
    # The chart was drawn (matplotlib ran) and nothing was written under $HOME.
    assert (Path(spec.output_dir) / "bucket_distribution.png").is_file()
    assert list(user_home.iterdir()) == []


# --- the run queue -----------------------------------------------------------------------------


def test_project_instance_queues_one_run_per_code_location(tmp_path):
    import dagster as dg

    from bucket_assets.cli import DEFAULT_INSTANCE_YAML

    project = yaml.safe_load((REPO / "dagster.yaml").read_text())
    # A home the CLI seeds without ./dagster.yaml gets the same settings.
    assert yaml.safe_load(DEFAULT_INSTANCE_YAML) == project
    assert project["telemetry"] == {"enabled": False}
    assert project["run_queue"]["max_concurrent_runs"] == 2
    home = tmp_path / "home"
    home.mkdir()
    # The settings only: the project's storage paths are relative to the cwd (the checkout's own
    # .dagster_home when pytest runs from the root), as the CLI's seeding also drops them.
    from bucket_assets.cli import _STORAGE_KEYS

    settings = {k: v for k, v in project.items() if k not in _STORAGE_KEYS}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 2
        assert {"key": "dagster/code_location", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in [
            dict(t) for t in queue.tag_concurrency_limits
        ]


# --- matplotlib and $HOME ----------------------------------------------------------------------

CHART = """
from bucket_assets.core.pictures import bucket_chart_png
m = {"name": "t", "buckets": {"b1": {"aspect": 1.0, "scaled": {"w": 64, "h": 64}, "count": 3}}}
assert bucket_chart_png(m)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
import matplotlib
print(matplotlib.get_cachedir())
"""


def test_chart_writes_nothing_under_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", CHART], capture_output=True, text=True, env=_no_mpl_env(HOME=str(home), TMPDIR=str(tmp))
    )
    assert res.returncode == 0, res.stderr
    assert list(home.iterdir()) == []
    cache = Path(res.stdout.strip())
    assert cache == tmp / f"bucket_assets-mpl-{os.getuid()}"
    assert cache.stat().st_mode & 0o777 == 0o700
    assert any(cache.glob("fontlist-*.json"))  # the font cache lives here and is reused next time
    assert "Matplotlib created a temporary" not in res.stderr


def test_chart_respects_the_users_mplconfigdir(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    mine = tmp_path / "mine"
    res = subprocess.run(
        [sys.executable, "-c", CHART], capture_output=True, text=True,
        env=_no_mpl_env(HOME=str(home), MPLCONFIGDIR=str(mine)),
    )
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == mine
    assert list(home.iterdir()) == []


def test_chart_does_not_use_a_temp_dir_someone_else_planted(tmp_path):
    """A symlink (or a dir not ours) at the private path is not trusted; a fresh private dir is used."""
    home = tmp_path / "home"
    home.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp / f"bucket_assets-mpl-{os.getuid()}").symlink_to(elsewhere)
    res = subprocess.run(
        [sys.executable, "-c", CHART], capture_output=True, text=True, env=_no_mpl_env(HOME=str(home), TMPDIR=str(tmp))
    )
    assert res.returncode == 0, res.stderr
    assert list(home.iterdir()) == [] and list(elsewhere.iterdir()) == []
    cache = Path(res.stdout.strip())
    assert cache.parent == tmp and cache.name.startswith("bucket_assets-mpl-") and not cache.is_symlink()


# --- one Dagster home shared by builds of different specs --------------------------------------

OPEN_INSTANCE = """
import sys, time
import dagster as dg
from bucket_assets.core.buildlock import instance_creation_lock
start = float(sys.argv[2])
while time.time() < start:
    pass
with instance_creation_lock(sys.argv[1]):
    instance = dg.DagsterInstance.get()
with instance:
    instance.get_runs(limit=1)
print("ok")
"""


def test_processes_opening_a_new_instance_at_once_both_succeed(tmp_path):
    """Two processes creating one new SQLite instance at once fail without the lock (`table ...
    already exists`, about one try in three here); builds of different specs may share a home."""
    for attempt in range(3):
        home = tmp_path / f"home{attempt}"
        home.mkdir()
        start = str(time.time() + 4)  # both past their imports, then create the instance together
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_INSTANCE, str(home), start], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env={**os.environ, "DAGSTER_HOME": str(home)},
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and out == "ok\n", err[-2000:]
