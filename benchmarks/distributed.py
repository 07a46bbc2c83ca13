"""Benchmark: the build with its heavy work on Celery workers (Redis broker) vs on this machine.

Starts redis-server on a free loopback port, then for each worker count starts that many
Celery workers (one process each) and times `bucket-assets build` of N real photos (a folder
source), reporting images/s of the whole build and of the processed_images and bucket_shards
steps (from the Dagster instance's step stats). The local process-pool build with the same
process count is measured alongside. Needs redis-server (Debian) and `pip install -e .[distributed]`.

    python benchmarks/distributed.py --images 1000 --workers 1,2
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from image_throughput import folder_spec, make_corpus, photo_paths  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path, files: list[Path], workers: int, broker: str | None) -> dict:
    import dagster as dg

    spec = folder_spec(root, files, workers)
    env = {**os.environ, "DAGSTER_HOME": str(root / "home")}
    env.pop("BUCKET_ASSETS_CELERY_BROKER", None)
    if broker:
        env["BUCKET_ASSETS_CELERY_BROKER"] = broker
    exe = os.path.join(os.path.dirname(sys.executable), "bucket-assets")
    t = time.perf_counter()
    r = subprocess.run([exe, "build", "--spec", str(spec)], env=env, capture_output=True, text=True)
    total = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"build failed: {r.stderr[-800:]}")
    steps = {}
    with dg.DagsterInstance.from_config(str(root / "home")) as inst:
        run = inst.get_runs()[0]
        for s in inst.get_run_step_stats(run.run_id):
            steps[s.step_key] = s.end_time - s.start_time
    return {"total": total, "render": steps.get("processed_images"), "shards": steps.get("bucket_shards")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default="/tmp/bench_distributed")
    args = ap.parse_args()
    root = Path(args.out)
    corpus = make_corpus(Path("/tmp/bench_images/corpus"), args.images, photo_paths(False), os.cpu_count() or 1)[: args.images]
    redis = shutil.which("redis-server")
    if not redis:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = _port()
    server = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{port}/0"
    time.sleep(1)
    rows = []
    try:
        for k in [int(x) for x in args.workers.split(",")]:
            local = build(root / f"local{k}", corpus, k, None)
            env = {**os.environ, "BUCKET_ASSETS_CELERY_BROKER": broker}
            workers = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "bucket_assets.distributed", "worker",
                                         "--concurrency", "1", "-n", f"b{i}@%h", "--loglevel", "WARNING",
                                         "--without-gossip", "--without-mingle"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True) for i in range(k)]
            try:
                from celery import Celery

                probe = Celery(broker=broker, backend=broker)
                deadline = time.time() + 90
                while len(probe.control.ping(timeout=1.0) or []) < k and time.time() < deadline:
                    time.sleep(1)
                dist = build(root / f"celery{k}", corpus, k, broker)
            finally:
                for w in workers:
                    os.killpg(w.pid, signal.SIGTERM)
                for w in workers:
                    w.wait(timeout=30)
            rows.append((k, local, dist))
    finally:
        server.terminate()
    n = len(corpus)
    print(f"{n} images; images/s (whole build | processed_images step | bucket_shards step)")
    print("| processes | local pool | Celery workers |\n| ---: | --- | --- |")
    for k, local, dist in rows:
        fmt = lambda r: f"{n / r['total']:.1f} \\| {n / r['render']:.1f} \\| {n / r['shards']:.0f}"  # noqa: E731
        print(f"| {k} | {fmt(local)} | {fmt(dist)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
