"""The distributed build on a real engine: Redis (Debian's redis-server) as Celery's broker and
result backend, started here on 127.0.0.1, and two Celery worker processes. The build of the
sample spec, coordinated by `bucket-assets build` with its export and work dirs moved by the
resource (env) to other paths, must equal the single-machine build byte for byte.

Skipped without redis-server, unless BUCKET_ASSETS_REQUIRE_ENGINE=1 (.ci/run sets it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bucket_assets.core.failpoints import ENV as FAILPOINT_ENV
from bucket_assets.core.manifest import VOLATILE_FIELDS, verify_export
from bucket_assets.distributed import BROKER_ENV, CHUNK_ENV
from bucket_assets_tests.conftest import free_port, run_cli, spec_dict, wait_for

REQUIRED = os.environ.get("BUCKET_ASSETS_REQUIRE_ENGINE") == "1"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    redis = shutil.which("redis-server")
    try:
        import celery  # noqa: F401
    except ImportError:
        celery = None
    if not redis or celery is None:
        if REQUIRED:
            pytest.fail("redis-server and celery are required here (BUCKET_ASSETS_REQUIRE_ENGINE=1)")
        pytest.skip("redis-server or celery not installed")
    d = tmp_path_factory.mktemp("engine")
    port = free_port()
    server = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{port}/0"
    workers = []
    try:
        import redis as redis_client

        def up() -> bool:
            try:
                return bool(redis_client.Redis(host="127.0.0.1", port=port).ping())
            except redis_client.exceptions.ConnectionError:
                return False

        wait_for(up, 20, "redis-server", server)
        # Every render on a worker takes at least SLOW_S: a chunk outlasts the broker's hand-off,
        # so the test's split of one bucket over both workers does not depend on machine load.
        env = {**os.environ, BROKER_ENV: broker, FAILPOINT_ENV: "slow:render"}
        for name in ("w1", "w2"):
            log = open(d / f"{name}.log", "w")
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bucket_assets.distributed", "worker", "--concurrency", "1",
                 "--pool", "prefork", "-n", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        from celery import Celery

        probe = Celery(broker=broker, backend=broker)
        wait_for(lambda: len(probe.control.ping(timeout=1.0) or []) >= 2, 90, "two Celery workers")
        yield {"broker": broker, "dir": d, "workers": workers}
    finally:
        for w in workers:
            try:
                os.killpg(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
        server.terminate()
        server.wait(timeout=10)


def _shards(export: Path) -> dict[str, bytes]:
    return {str(p.relative_to(export)): p.read_bytes() for p in sorted(export.rglob("shard-*.tar"))}


def _manifest(export: Path) -> dict:
    m = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    return {k: v for k, v in m.items() if k not in VOLATILE_FIELDS}


def _largest_bucket_rendered_by_both(shared: Path) -> None:
    """Work inside one bucket is split: the largest bucket's packs come from both workers."""
    largest = max((shared / "work" / "processed").iterdir(), key=lambda d: sum(p.stat().st_size for p in d.glob("pack-*.bin")))
    assert len({p.name.split("-")[1] for p in largest.glob("pack-*.bin")}) == 2, sorted(largest.glob("pack-*.bin"))


def test_celery_build_equals_the_single_machine_build(engine, sample_root, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "spec.yaml").write_text(yaml.safe_dump(spec_dict(sample_root, single, **{"image.workers": 1})))
    res = run_cli("build", "--spec", str(single / "spec.yaml"), env={"DAGSTER_HOME": str(single / "home")})
    assert res.returncode == 0, res.stderr[-3000:]

    dist = tmp_path / "dist"
    dist.mkdir()
    # The same spec file content; only the resource (env) moves the dirs to "shared storage".
    (dist / "spec.yaml").write_text((single / "spec.yaml").read_text())
    shared = tmp_path / "shared"
    # Chunks of 2 samples, so even the sample's largest bucket (7 images) spreads over both workers.
    env = {"DAGSTER_HOME": str(dist / "home"), BROKER_ENV: engine["broker"], CHUNK_ENV: "2",
           "BUCKET_ASSETS_OUTPUT_DIR": str(shared / "export"), "BUCKET_ASSETS_WORK_DIR": str(shared / "work")}
    t = time.monotonic()
    res = run_cli("build", "--spec", str(dist / "spec.yaml"), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(shared / "export") in res.stdout
    assert time.monotonic() - t < 300
    assert not (single / "export").samefile(shared / "export")
    verify_export(shared / "export")
    assert _shards(shared / "export") == _shards(single / "export")
    assert _manifest(shared / "export") == _manifest(single / "export")

    # The pixels were rendered by the two worker processes, not by the coordinator.
    pids_before = set((shared / "work" / "processed").rglob("pack-*.bin"))
    pids = {p.name.split("-")[1] for p in pids_before}
    logs = "".join((engine["dir"] / f"{n}.log").read_text() for n in ("w1", "w2"))
    assert "bucket_assets.run_chunk" in logs
    assert len(pids) >= 2, pids
    _largest_bucket_rendered_by_both(shared)
    for name in ("w1", "w2"):
        assert "succeeded" in (engine["dir"] / f"{name}.log").read_text(), f"worker {name} ran no task"

    # The scan ran on the workers as well: each part's summary (written by the worker that
    # scanned it) names a process of worker w1 or w2, and both scanned.
    scanned = {p: p.stat().st_mtime_ns for p in (shared / "work" / "scan").rglob("*.json")}
    by = {w.pid: set() for w in engine["workers"]}
    for p in scanned:
        pid = int(json.loads(p.read_text())["worker"].rsplit(":", 1)[1])
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid in by, f"{p.name} was scanned by {pid}, not a Celery worker"
        by[ppid].add(p)
    assert len(scanned) == 6 and all(by.values()), by  # 2 tars, pcb, folder, 2 hub files

    # The same workers (still holding their packs open) serve the next runs: a quality change
    # re-renders everything into new packs and prunes the old ones; changing it back gives the
    # original bytes again.
    spec = yaml.safe_load((dist / "spec.yaml").read_text())
    for quality in (90, 95):
        spec["image"]["jpeg"]["quality"] = quality
        (dist / "spec.yaml").write_text(yaml.safe_dump(spec))
        res = run_cli("build", "--spec", str(dist / "spec.yaml"), env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        verify_export(shared / "export")
        packs = {str(p) for p in (shared / "work" / "processed").rglob("pack-*.bin")}
        assert packs and not packs & {str(p) for p in pids_before}
        _largest_bucket_rendered_by_both(shared)
        pids_before = set(packs)
        # Nothing the scan reads changed: no part was scanned again.
        assert {p: p.stat().st_mtime_ns for p in (shared / "work" / "scan").rglob("*.json")} == scanned
    assert _shards(shared / "export") == _shards(single / "export")


def test_celery_fetches_urls(engine, tmp_path):
    from bucket_assets.core.download import DownloadSettings
    from bucket_assets.distributed import CeleryCompute
    from bucket_assets_tests.core.test_download import FaultServer

    with FaultServer() as server:
        items = [(f"i{n}", server.base + p, str(tmp_path / "store"), DownloadSettings(retries=0, timeout_s=5))
                 for n, p in enumerate(["/img/1", "/404", "/html", "/img/2"] * 5)]
        rows = list(CeleryCompute(engine["broker"], chunk=3).map("fetch", items))
    assert [r["image_id"] for r in rows] == [i[0] for i in items]
    assert [r["status"] for r in rows[:4]] == ["ok", "http_404", "not_an_image", "ok"]


def test_celery_workers_fetch_a_url_sources_todo(engine, tmp_path):
    """url_downloads on the workers: the run streams its todo to them in batches and commits
    their rows; a rerun fetches nothing."""
    from bucket_assets.distributed import CeleryCompute
    from bucket_assets_tests.core.test_download import FaultServer
    from bucket_assets_tests.core.test_url_downloads import Fixture, _urls

    f = Fixture(tmp_path)
    with FaultServer() as server:
        paths = [f"/img/{n}" for n in range(9)] + ["/404", "/html"]
        src = f.source("web", _urls([f"k{n}" for n in range(len(paths))], [server.base + p for p in paths]))
        workers = CeleryCompute(engine["broker"], chunk=2)
        planned, done = f.build(src, batch_rows=4, engine=workers)
        assert planned == {"web": (11, 11)} and done.fetched == 11
        assert all(server.hits[p] == 1 for p in paths)
        rows = f.rows()
        assert [rows[("web", f"k{n}")]["status"] for n in range(len(paths))] == ["ok"] * 9 + ["http_404", "not_an_image"]
        planned, done = f.build(src, engine=workers)
        assert planned == {"web": (11, 0)} and f.log == [] and all(server.hits[p] == 1 for p in paths)


def test_no_worker_fails_fast_naming_the_broker(engine):
    from bucket_assets.distributed import CeleryCompute

    # A database no worker listens on (the workers use /0).
    broker = engine["broker"].rsplit("/", 1)[0] + "/5"
    with pytest.raises(RuntimeError, match="no Celery worker answers on redis://127.0.0.1"):
        list(CeleryCompute(broker).map("shard", [{}]))
