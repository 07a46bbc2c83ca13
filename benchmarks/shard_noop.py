"""Benchmark: the bucket_shards step of a no-op rebuild (issue 13).

    python benchmarks/shard_noop.py --images 10000 --out /tmp/bench_shards [--repeat 3] [--workers 2]

1. Writes N small JPEGs (folder source, sidecar captions; long side 200-400 px, aspects 0.5-2.0)
   and a spec at base resolution 128 with small shards (shards.max_samples, default 250), so
   the export has dozens of shards over many buckets.
2. Builds it once in process (the whole build job, all bucket partitions).
3. Runs the whole build job again --repeat times with nothing changed and reports each step's
   wall time from the run's event log (bucket_shards first), plus what bucket_shards says it
   did (run_files_rewritten, and run_shards_unchanged / run_shards_built where present).
4. With --caption-change, recaptions the images of one bucket and times that rebuild too.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bucket_assets_tests (materialize_all)


def make_corpus(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return
    rng = np.random.RandomState(seed)
    for i in range(n):
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        long = int(rng.randint(200, 401))
        w, h = (long, max(1, int(long / aspect))) if aspect >= 1 else (max(1, int(long * aspect)), long)
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.randint(0, 256, size=3)
        img = np.stack([(base[c] + xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], axis=-1)
        img = (img + rng.randint(0, 24, size=img.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85)
        (folder / f"img_{i:07d}.jpg").write_bytes(buf.getvalue())
        (folder / f"img_{i:07d}.txt").write_text(f"a synthetic picture number {i} with gradient {base.tolist()}\n")


def write_spec(root: Path, max_samples: int, workers: int) -> Path:
    spec = {
        "name": "bench_shards",
        "output_dir": str(root / "export"),
        "work_dir": str(root / "work"),
        "sources": [{"name": "folder", "kind": "folder", "path": str(root / "raw" / "folder"),
                     "caption_variant": "sidecar"}],
        "buckets": {"base_resolutions": [128], "divisible": 16},
        "image": {"mode": "reencode_jpeg", "workers": workers},
        "captions": {"landing_dir": str(root / "captions"), "selectors": ["sidecar"], "missing": "empty"},
        "shards": {"max_samples": max_samples, "max_bytes": 1_000_000_000},
    }
    (root / "captions").mkdir(parents=True, exist_ok=True)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_build(spec_path: Path):
    import dagster as dg

    from bucket_assets.spec import SPEC_ENV_VAR

    os.environ[SPEC_ENV_VAR] = str(spec_path)  # definitions.py loads a spec at import
    from bucket_assets_tests.conftest import materialize_all

    instance = dg.DagsterInstance.ephemeral()
    t0 = time.perf_counter()
    result = materialize_all(spec_path, instance)
    wall = time.perf_counter() - t0
    assert result.success
    steps: dict[str, list[float]] = {}
    for e in instance.all_logs(result.run_id):
        ev = e.dagster_event
        if ev is None or ev.step_key is None:
            continue
        if ev.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            steps.setdefault(ev.step_key, []).append(e.timestamp)
    times = {k: v[-1] - v[0] for k, v in steps.items() if len(v) >= 2}
    meta = {}
    for mat in result.asset_materializations_for_node("bucket_shards"):
        meta.update({k: v.value for k, v in mat.metadata.items() if k.startswith("run_")})
    return wall, times, meta


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--out", default="/tmp/bench_shards")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-samples", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--caption-change", action="store_true")
    args = ap.parse_args()
    import bucket_assets

    print(f"bucket_assets from {Path(bucket_assets.__file__).parent}")
    root = Path(args.out)
    t0 = time.perf_counter()
    make_corpus(root / "raw" / "folder", args.images)
    print(f"corpus: {args.images} images in {time.perf_counter() - t0:.1f}s")
    spec_path = write_spec(root, args.max_samples, args.workers)
    wall, times, meta = run_build(spec_path)
    print(f"first build: {wall:.1f}s; bucket_shards {times.get('bucket_shards', float('nan')):.2f}s; {meta}")
    for i in range(args.repeat):
        wall, times, meta = run_build(spec_path)
        top = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:6])
        print(f"no-op rebuild {i + 1}: {wall:.1f}s; bucket_shards {times['bucket_shards']:.2f}s; {meta}\n    {top}")
    if args.caption_change:
        folder = root / "raw" / "folder"
        for p in sorted(folder.glob("*.txt"))[::97]:
            p.write_text(p.read_text() + " recaptioned\n")
        wall, times, meta = run_build(spec_path)
        print(f"caption change (1 in 97): {wall:.1f}s; bucket_shards {times['bucket_shards']:.2f}s; {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
