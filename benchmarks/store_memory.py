"""Benchmark: time and peak memory of the processed-image store, for one or more code trees.

    python benchmarks/store_memory.py --images 2000,10000 --out /tmp/bench_store \
        [--tree before=/tmp/store-before] [--tree after=.] [--workers 2]

Corpus: N LAION-style tars (img2dataset layout, 1000 samples per tar: <key>.jpg/.txt/.json) of
small crops (long side 150-260 px, aspect 0.5-2.0) of the photographs scikit-image ships, built
at base resolution 128, so the per-image codec work is small and what the coordinator keeps per
image shows. For each code tree (a directory holding a `bucket_assets` package: the one under
test, or an older commit unpacked with `git archive`) and each size, in one run:

1. a clean `bucket-assets build` (fresh work, export and DAGSTER_HOME): wall time, the
   coordinating process's peak RSS (the CLI runs the job in process) and the peak RSS of its
   whole process tree (render workers included);
2. a no-op rebuild of processed_images alone (every bucket partition in one run, in process, in
   a fresh interpreter): the step's wall time and that process's peak RSS, also as the growth
   above what the interpreter held before the step started (imports, definitions).

The per-image slope between two sizes is what the coordinator keeps per image. DuckDB runs in
the coordinator: its buffer pool and operators use memory up to `metadata.memory_limit` and then
spill, so with the default 3GB cap part of the slope is DuckDB's; `--memory-limit 128MB` shows
what is left once DuckDB is held to a small cap.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PER_TAR = 1000

STEP = r"""
import json, os, sys, time
spec = sys.argv[1]
os.environ["BUCKET_ASSETS_SPEC"] = spec
import dagster as dg
from bucket_assets.core.buckets import bucket_table
from bucket_assets.definitions import build_definitions
from bucket_assets.spec import load_spec

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

defs = build_definitions(spec)
asset = defs.resolve_assets_def("processed_images")
s = load_spec(spec)
ids = [b.id for b in bucket_table(s.buckets.base_resolutions, s.buckets.divisible)]
import bucket_assets
before = rss("VmRSS:")
t = time.perf_counter()
with dg.DagsterInstance.ephemeral() as instance:
    res = dg.materialize([asset], instance=instance, raise_on_error=True,
                         tags={"dagster/asset_partition_range_start": ids[0], "dagster/asset_partition_range_end": ids[-1]})
elapsed = time.perf_counter() - t
md = {}
for ev in res.get_asset_materialization_events():
    m = ev.materialization.metadata
    if "run_rendered" in m:
        md = {k: m[k].value for k in ("run_samples", "run_rendered", "run_reused")}
print(json.dumps({"elapsed": elapsed, "before": before, "peak": rss("VmHWM:"), "module": bucket_assets.__file__, **md}))
"""


def _make_tar(args) -> None:
    t, n, out, seed = args
    from PIL import Image

    from bucket_assets.sample import load_photos

    photos = list(load_photos().values())
    rng = np.random.RandomState(seed + t)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(t * PER_TAR, t * PER_TAR + n):
            img = photos[i % len(photos)]
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w, h = img.size
            cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
            left, top = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
            long_side = int(rng.randint(150, 261))
            f = long_side / max(cw, ch)
            piece = img.crop((left, top, left + cw, top + ch)).resize(
                (max(1, round(cw * f)), max(1, round(ch * f))), Image.BILINEAR)
            jb = io.BytesIO()
            piece.save(jb, "JPEG", quality=90)
            key = f"{i:09d}"
            meta = {"url": f"https://example.com/{key}.jpg", "caption": f"photo {i}", "key": key, "status": "success",
                    "similarity": 0.4, "NSFW": "UNLIKELY", "LICENSE": "?", "original_width": piece.width,
                    "original_height": piece.height}
            for name, data in ((f"{key}.jpg", jb.getvalue()), (f"{key}.txt", f"photo {i}".encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 0
                tf.addfile(ti, io.BytesIO(data))
    (Path(out) / f"{t:05d}.tar").write_bytes(buf.getvalue())


def make_corpus(root: Path, n: int, workers: int) -> Path:
    d = root / f"corpus-{n}"
    if not (d / ".done").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        jobs = [(t, min(PER_TAR, n - t * PER_TAR), str(d), 0) for t in range(-(-n // PER_TAR))]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_make_tar, jobs))
        (d / ".done").touch()
    return d


def write_spec(root: Path, corpus: Path, workers: int, memory_limit: str | None = None) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    spec = {"name": "bench", "output_dir": str(root / "export"), "work_dir": str(root / "work"),
            "sources": [{"name": "laion", "kind": "webdataset", "paths": [str(corpus / "*.tar")],
                         "caption_variant": "alt_text"}],
            "captions": {"landing_dir": str(root / "captions"), "selectors": ["alt_text"]},
            "buckets": {"base_resolutions": [128], "divisible": 16},
            "image": {"workers": workers}}
    if memory_limit:
        spec["metadata"] = {"memory_limit": memory_limit}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


class Rss:
    """Peak RSS of a process and of its whole tree, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.root_peak, self.tree_peak, self._stop = pid, 0, 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += [c for c, pp in parents.items() if pp == p]
        return out

    def _run(self) -> None:
        while not self._stop:
            root = self._rss(self.pid)
            self.root_peak = max(self.root_peak, root)
            self.tree_peak = max(self.tree_peak, root + sum(self._rss(p) for p in self._tree()[1:]))
            time.sleep(0.05)

    def stop(self) -> tuple[int, int]:
        self._stop = True
        self._t.join()
        return self.root_peak, self.tree_peak


def _env(tree: Path, root: Path) -> dict:
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home"), "PYTHONPATH": str(tree)}
    env.pop("BUCKET_ASSETS_FAILPOINT", None)
    (root / "dagster_home").mkdir(exist_ok=True)
    return env


def clean_build(tree: Path, root: Path) -> dict:
    env = _env(tree, root)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bucket_assets.cli", "build", "--spec", str(root / "spec.yaml")],
                            env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = Rss(proc.pid)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - t
    root_peak, tree_peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({tree}): {err.strip()[-800:]}")
    return {"elapsed": elapsed, "root_peak": root_peak, "tree_peak": tree_peak}


def noop_step(tree: Path, root: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", STEP, str(root / "spec.yaml")], env=_env(tree, root), cwd=tree,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"processed_images run failed ({tree}): {r.stderr.strip()[-800:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if not d["module"].startswith(str(tree.resolve())):
        raise SystemExit(f"{tree}: ran the package at {d['module']}, not this tree's")
    if d.get("run_rendered"):
        raise SystemExit(f"{tree}: the no-op rebuild rendered {d['run_rendered']} image(s)")
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="2000,10000")
    ap.add_argument("--out", default="/tmp/bench_store")
    ap.add_argument("--tree", action="append", default=[], help="name=dir of a code tree (default: this one)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-limit", help="metadata.memory_limit of the spec (DuckDB's cap; default the spec's 3GB)")
    args = ap.parse_args()
    out = Path(args.out)
    sizes = [int(x) for x in args.images.split(",") if x]
    trees = [(n, Path(d).resolve()) for n, d in (t.split("=", 1) for t in args.tree)] or [("this", REPO)]
    mb = 2**20
    results: dict[tuple[str, int], tuple[dict, dict]] = {}
    for n in sizes:
        corpus = make_corpus(out, n, args.workers)
        for name, tree in trees:
            root = out / f"{name}-{n}"
            write_spec(root, corpus, args.workers, args.memory_limit)
            b = clean_build(tree, root)
            s = noop_step(tree, root)
            results[(name, n)] = (b, s)
            print(f"{name:>8} {n:>6} images | clean build {b['elapsed']:6.1f}s, coordinator peak "
                  f"{b['root_peak'] / mb:5.0f} MB, tree peak {b['tree_peak'] / mb:5.0f} MB | processed_images no-op "
                  f"{s['elapsed']:5.2f}s, peak {s['peak'] / mb:5.0f} MB (+{(s['peak'] - s['before']) / mb:4.0f} MB "
                  f"during the step; {s.get('run_samples')} samples)", flush=True)
            shutil.rmtree(root)
    if len(sizes) >= 2:
        a, z = min(sizes), max(sizes)
        for name, _ in trees:
            (b0, s0), (b1, s1) = results[(name, a)], results[(name, z)]
            print(f"{name:>8} per image from {a} to {z}: clean build coordinator "
                  f"{(b1['root_peak'] - b0['root_peak']) / (z - a) / 1024:+.2f} KB, no-op step "
                  f"{(s1['peak'] - s0['peak']) / (z - a) / 1024:+.2f} KB, no-op step time "
                  f"{1000 * (s1['elapsed'] - s0['elapsed']) / (z - a):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
