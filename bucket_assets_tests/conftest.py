"""Shared fixtures: the sample dataset generated once per session, and specs pointing at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

import dagster as dg

from bucket_assets.core.buckets import bucket_table
from bucket_assets.definitions import BUILD_JOB, build_definitions
from bucket_assets.sample import generate
from bucket_assets.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    generate(root)
    return root


def spec_dict(sample_root: Path, out: Path, **overrides) -> dict:
    raw = sample_root / "raw"
    spec = yaml.safe_load((REPO / "data" / "spec.yaml").read_text())
    spec["output_dir"] = str(out / "export")
    spec["work_dir"] = str(out / "work")
    spec["sources"][0]["paths"] = [str(raw / "laion" / "*.tar")]
    spec["sources"][1]["path"] = str(raw / "pcb" / "photo-concept-bucket.parquet")
    spec["sources"][1]["image_dir"] = str(raw / "pcb" / "train")
    spec["sources"][2]["path"] = str(raw / "folder")
    spec["sources"][3]["path"] = str(raw / "hf" / "data" / "*.parquet")
    spec["captions"]["landing_dir"] = str(sample_root / "captions")
    spec["image"]["workers"] = 1
    for dotted, value in overrides.items():
        node = spec
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return spec


@pytest.fixture
def make_spec(sample_root, tmp_path):
    def _make(name: str = "build", **overrides) -> Path:
        out = tmp_path / name
        out.mkdir(parents=True, exist_ok=True)
        path = out / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_dict(sample_root, out, **overrides)))
        return path

    return _make


def materialize_all(spec_path: Path, instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    """Run the real build job (all assets, all bucket partitions, checks) in process."""
    defs = build_definitions(str(spec_path))
    spec = load_spec(spec_path)
    ids = [b.id for b in bucket_table(spec.buckets.base_resolutions, spec.buckets.divisible)]
    job = defs.resolve_job_def(BUILD_JOB)
    return job.execute_in_process(
        instance=instance or dg.DagsterInstance.ephemeral(),
        tags={"dagster/asset_partition_range_start": ids[0], "dagster/asset_partition_range_end": ids[-1]},
    )


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("bucket-assets", path=os.path.dirname(sys.executable))
    cmd = [exe, *args] if exe else [sys.executable, "-m", "bucket_assets.cli", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def wait_for(pred, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited early ({proc.returncode}) while waiting for {what}")
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def dagster_dev(cwd: Path, env: dict, port: int, startup_timeout: float = 120) -> Iterator[subprocess.Popen]:
    """`dg dev` (webserver + daemon) of this project (its pyproject's [tool.dg]: the README's UI
    command) on 127.0.0.1:port in its own session, up and answering when the block starts; stopped
    (SIGTERM, then SIGKILL) when it ends. Log: cwd/dagster_dev.log. dg runs Dagster from the project
    root; the instance is env's DAGSTER_HOME."""
    import signal
    import urllib.request

    dg_exe = os.path.join(os.path.dirname(sys.executable), "dg")
    log = open(cwd / "dagster_dev.log", "w")
    proc = subprocess.Popen(
        [dg_exe, "dev", "--target-path", str(REPO), "-h", "127.0.0.1", "-p", str(port)],
        cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, startup_timeout, "the webserver", proc)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextmanager
def unwritable_dir(path: Path) -> Iterator[None]:
    """`path` cannot be written to (entries created, removed or renamed) inside the block. Root
    ignores permission bits, so as root the immutable attribute is used; skips where neither
    binds."""
    if os.geteuid() == 0:
        lock = subprocess.run(["chattr", "+i", str(path)], capture_output=True) if shutil.which("chattr") else None
        if lock is None or lock.returncode != 0:
            pytest.skip("running as root and chattr +i is not available here")
        unlock = ["chattr", "-i", str(path)]
    else:
        path.chmod(0o555)
        unlock = ["chmod", "755", str(path)]
    try:
        yield
    finally:
        subprocess.run(unlock, check=True)


class CountingConnection:
    """A DuckDB connection that records how many rows each DELETE / INSERT on `table` wrote."""

    def __init__(self, con, log: list, table: str):
        self._con, self._log, self._table = con, log, f'"{table}"'

    def execute(self, sql, *args):
        res = self._con.execute(sql, *args)
        verb = sql.split(None, 1)[0].upper()
        if verb in ("DELETE", "INSERT") and self._table in sql:
            self._log.append((verb, res.fetchone()[0]))
        return res

    def __getattr__(self, name):
        return getattr(self._con, name)
