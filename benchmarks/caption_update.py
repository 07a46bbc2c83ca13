"""Benchmark: a new caption source vs a full build from scratch (issue: caption sources land).

    python benchmarks/caption_update.py --images 20000 --out /tmp/bench_captions

1. Writes N web-sized JPEGs cut from the photographs scikit-image ships (folder source) and a
   caption source covering all of them.
2. Times `bucket-assets build` from scratch (a fresh DAGSTER_HOME, work and export dirs).
3. Drops a second caption source that recaptions every image of about one bucket in ten, then
   runs exactly what the sensors request, in process, timed: the landing sensor's run
   (caption_table + selected_captions), the re-shard runs the change sensor asks for, and the
   manifest + card run; then verifies the export. It counts the images decoded or encoded
   (processed-store files written) and the shard files rewritten.
4. With --daemon, also measures the same update through `dagster dev` (sensor ticks and a
   process per run included) on a second new source.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _make_images(args):
    start, count, out_dir, seed = args
    from bucket_assets.sample import _fit, load_photos

    photos = load_photos()
    rng = np.random.RandomState(seed + start)
    for i in range(start, start + count):
        # Web-like aspects (most near 4:3 and 3:2), each cut large enough to fill its bucket.
        aspect = float(np.exp(rng.normal(0.0, 0.45)))
        aspect = min(max(aspect, 0.3), 3.3)
        _, img = _fit(rng, photos, aspect)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (Path(out_dir) / f"img_{i:07d}.jpg").write_bytes(buf.getvalue())
    return count


def make_corpus(root: Path, n: int, workers: int) -> None:
    images = root / "raw" / "folder"
    images.mkdir(parents=True, exist_ok=True)
    have = len(list(images.glob("*.jpg")))
    if have == n:
        return
    shutil.rmtree(images)
    images.mkdir(parents=True)
    chunk = max(1, n // (workers * 8))
    jobs = [(s, min(chunk, n - s), str(images), 0) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_make_images, jobs))
    assert done == n


def write_source(landing: Path, name: str, ids: list[str], model: str, created: int, prefix: str) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": ids, "caption": [f"{prefix} {i}" for i in ids]}), landing / f"{name}.parquet")
    (landing / f"{name}.json").write_text(json.dumps({
        "variant": "caption_gemini_2_flash_lite", "backend": "bench", "model": model, "created_at": created,
        "system_prompt_sha256": "0" * 64, "user_prompt_sha256": "0" * 64,
    }))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--out", default="/tmp/bench_captions")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--daemon", action="store_true", help="also measure through dagster dev")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    make_corpus(root, args.images, args.workers)
    print(f"corpus: {args.images} JPEGs in {time.perf_counter() - t:.1f}s")
    ids = [f"img_{i:07d}" for i in range(args.images)]
    landing = root / "captions"
    shutil.rmtree(landing, ignore_errors=True)
    write_source(landing, "base", ids, "bench/base", 1000, "A base caption for")

    for d in ("work", "export", "dagster_home"):
        shutil.rmtree(root / d, ignore_errors=True)
    spec = {
        "name": "bench", "output_dir": str(root / "export"), "work_dir": str(root / "work"),
        "sources": [{"name": "folder", "kind": "folder", "path": str(root / "raw" / "folder")}],
        "captions": {"landing_dir": str(landing), "selectors": ["caption_gemini_2_flash_lite", "sidecar"]},
        "image": {"workers": args.workers},
    }
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home"), "BUCKET_ASSETS_SPEC": str(spec_path)}
    exe = os.path.join(os.path.dirname(sys.executable), "bucket-assets")

    t = time.perf_counter()
    res = subprocess.run([exe, "build", "--spec", str(spec_path)], env=env, capture_output=True, text=True)
    full = time.perf_counter() - t
    if res.returncode != 0:
        print(res.stderr[-3000:])
        return 1
    print(f"full build: {full:.1f}s ({args.images / full:.1f} images/s)")

    os.environ.update(DAGSTER_HOME=env["DAGSTER_HOME"], BUCKET_ASSETS_SPEC=str(spec_path))
    import dagster as dg
    import duckdb

    from bucket_assets.core.manifest import verify_export
    from bucket_assets.definitions import build_definitions
    from bucket_assets.defs.resources import DatasetResource
    from bucket_assets.defs.sensors import caption_change_sensor, caption_landing_sensor

    con = duckdb.connect(str(root / "work" / "metadata.duckdb"), read_only=True)
    per_bucket = con.execute(
        "SELECT bucket_id, list(image_id ORDER BY image_id) FROM shard_samples GROUP BY bucket_id ORDER BY bucket_id"
    ).fetchall()
    con.close()
    chosen = per_bucket[:: 10] if len(per_bucket) >= 10 else per_bucket[:1]
    changed_ids = [i for _, ids_ in chosen for i in ids_]
    print(f"{len(per_bucket)} non-empty buckets; recaptioning {len(chosen)} bucket(s), {len(changed_ids)} images")

    export = root / "export"
    processed = root / "work" / "processed"
    store_before = {p: p.stat().st_mtime_ns for p in processed.rglob("*.jpg")}
    shards_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}

    instance = dg.DagsterInstance.get()
    resources = {"dataset": DatasetResource(spec_path=str(spec_path))}
    job = build_definitions(str(spec_path)).resolve_implicit_global_asset_job_def()

    def run(req):
        r = job.execute_in_process(instance=instance, asset_selection=req.asset_selection,
                                   partition_key=req.partition_key, tags=req.tags)
        assert r.success

    t0 = time.perf_counter()
    write_source(landing, "recaption", changed_ids, "bench/recaption", 2000, "A better caption for")
    t = time.perf_counter()
    landing_res = caption_landing_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    for req in landing_res.run_requests:
        run(req)
    t_captions = time.perf_counter() - t
    t = time.perf_counter()
    change = caption_change_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    reshard = [r for r in change.run_requests if r.partition_key]
    for req in reshard:
        run(req)
    t_shards = time.perf_counter() - t
    t = time.perf_counter()
    final = caption_change_sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=change.cursor))
    checks = []
    for req in final.run_requests:
        r = job.execute_in_process(instance=instance, asset_selection=req.asset_selection, tags=req.tags)
        assert r.success
        checks += r.get_asset_check_evaluations()
    t_manifest = time.perf_counter() - t
    incremental = time.perf_counter() - t0
    assert checks and all(c.passed for c in checks), checks
    read = [c.metadata["shards_read"].value for c in checks if c.check_name == "export_verifies"][0]
    t = time.perf_counter()
    rep = verify_export(export)
    t_verify = time.perf_counter() - t

    store_after = {p: p.stat().st_mtime_ns for p in processed.rglob("*.jpg")}
    rendered = sum(1 for p, m in store_after.items() if store_before.get(p) != m)
    shards_after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in export.rglob("shard-*.tar")}
    rewritten = sum(1 for p, s in shards_after.items() if shards_before.get(p) != s)
    manifest = json.loads((export / "manifest.json").read_text())
    assert "bench/recaption" in [s["model"] for s in manifest["caption_sources"]]
    print(f"incremental update (in process): {incremental:.2f}s = captions {t_captions:.2f}s + "
          f"re-shard {len(reshard)} bucket(s) {t_shards:.2f}s + manifest/card with checks {t_manifest:.2f}s "
          f"(export_verifies re-read {read} shard(s), the rewritten ones)")
    print(f"  = {100 * incremental / full:.2f}% of the full build; images decoded/encoded by processing: {rendered}; "
          f"shard files rewritten: {rewritten} of {len(shards_after)}")
    print(f"a full re-read of the export (bucket-assets verify, every JPEG decoded): {t_verify:.1f}s, {rep.samples} samples")

    if args.daemon:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
        proc = subprocess.Popen([dagster, "dev", "-h", "127.0.0.1", "-p", str(port), "-m", "bucket_assets.definitions"],
                                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            time.sleep(20)  # let the webserver and daemon settle before the clock starts
            t = time.perf_counter()
            write_source(landing, "recaption2", changed_ids, "bench/recaption2", 3000, "An even better caption for")
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    m = json.loads((export / "manifest.json").read_text())
                    if "bench/recaption2" in [s["model"] for s in m["caption_sources"]]:
                        break
                except (OSError, json.JSONDecodeError):
                    pass
                time.sleep(0.5)
            verify_export(export)
            print(f"through dagster dev (sensor ticks + one process per run): {time.perf_counter() - t:.1f}s")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
