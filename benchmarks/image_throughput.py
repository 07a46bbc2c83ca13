"""Benchmark: the image hot path against the codec floor, img2dataset, and itself at scale.

    python benchmarks/image_throughput.py --images 400 [--build-sizes 200,1000] [--memory-sizes 1000,10000] [--img2dataset] [--repeat 3]

Corpus: N JPEGs cut from real photographs at web sizes (long side 800-2000 px, aspect
0.5-2.0). Photos come from Debian's lomiri-wallpapers-16.04 (13 camera photos, 2000-5300 px,
CC-BY/CC-BY-SA/CC0; `--install-photos` runs apt-get for it) or, without it, from the
photographs scikit-image ships (smaller). In one run it measures:

1. the codec floor: decode each source and encode a target-size region at q95 with the same
   library (libjpeg-turbo via simplejpeg; Pillow shown too), no resize;
2. the product's processed-images stage (core.processing.render on the planned tasks) with 1
   worker (per-step ms) and all cores, and the exactness of the resize (PSNR vs float32);
3. with --img2dataset, img2dataset from PyPI (own venv) on the same files served over loopback
   HTTP: image_size 512, center_crop, q95, same process count;
4. whole `bucket-assets build` runs at --build-sizes (marginal cost per image and start-up);
5. peak memory (RSS of the build's whole process tree) at --memory-sizes.
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOMIRI = "/usr/share/backgrounds"
NOT_PHOTOS = {"umang_by_Abhishek_Mudgal.jpg", "warty-final-ubuntu.png"}


def photo_paths(install: bool) -> list[str]:
    paths = sorted(p for p in glob.glob(f"{LOMIRI}/*_by_*.jpg") if os.path.basename(p) not in NOT_PHOTOS)
    if not paths and install:
        subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends lomiri-wallpapers-16.04",
                       shell=True, check=False)
        paths = sorted(p for p in glob.glob(f"{LOMIRI}/*_by_*.jpg") if os.path.basename(p) not in NOT_PHOTOS)
    if paths:
        return paths
    import skimage

    d = Path(skimage.__file__).parent / "data"
    return [str(d / n) for n in ("retina.jpg", "hubble_deep_field.jpg", "motorcycle_left.png", "motorcycle_right.png")]


_PHOTOS: dict = {}


def _cut_one(args) -> None:
    i, photos, out = args
    from PIL import Image

    rng = np.random.RandomState(i)
    path = photos[i % len(photos)]
    if path not in _PHOTOS:
        _PHOTOS[path] = Image.open(path).convert("RGB")
    img = _PHOTOS[path]
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    w, h = img.size
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    left, top = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
    long_side = min(max(cw, ch), int(rng.randint(800, 2001)))
    f = long_side / max(cw, ch)
    piece = img.crop((left, top, left + cw, top + ch)).resize(
        (max(1, round(cw * f)), max(1, round(ch * f))), Image.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    piece.save(buf, "JPEG", quality=90)
    (Path(out) / f"img_{i:07d}.jpg").write_bytes(buf.getvalue())


def make_corpus(out: Path, n: int, photos: list[str], workers: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    have = sorted(out.glob("img_*.jpg"))
    if len(have) < n:
        todo = [(i, photos, str(out)) for i in range(len(have), n)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_cut_one, todo, chunksize=16))
    return sorted(out.glob("img_*.jpg"))[:n]


def plan_tasks(files: list[Path], store: Path):
    from bucket_assets.core.buckets import bucket_table, nearest_bucket, plan_cover
    from bucket_assets.core.imaging import probe
    from bucket_assets.core.processing import RenderParams, RenderTask

    table = bucket_table([512], 32)
    params = RenderParams("reencode_jpeg", 95, "adaptive_scale", 0.85, 100_000_000)
    tasks = []
    for f in files:
        data = f.read_bytes()
        h = probe(data, 100_000_000)
        b = nearest_bucket(h.width, h.height, table)
        plan = plan_cover(h.width, h.height, b, f.stem)
        if plan is None:
            continue
        tasks.append(RenderTask(f.stem, b.id, f.stem, "", str(f), None, None, None, plan.scale, plan.resized_w,
                                plan.resized_h, plan.crop_left, plan.crop_top, b.w, b.h,
                                str(store / b.id), params, h.orientation))
    return tasks


def _floor_simplejpeg(task) -> None:
    import simplejpeg

    rgb = simplejpeg.decode_jpeg(Path(task.location).read_bytes(), colorspace="RGB")
    region = np.ascontiguousarray(rgb[: task.target_h, : task.target_w])
    simplejpeg.encode_jpeg(region, quality=95, colorspace="RGB", colorsubsampling="444")


def _floor_pillow(task) -> None:
    from PIL import Image

    with Image.open(task.location) as im:
        im = im.convert("RGB")
        buf = io.BytesIO()
        im.crop((0, 0, task.target_w, task.target_h)).save(buf, "JPEG", quality=95, subsampling=0)


def _init() -> None:
    import torch

    torch.set_num_threads(1)


def timed_map(fn, items, workers: int) -> float:
    if workers <= 1:
        _init()
        for x in items[:2]:  # first imports are a fixed cost
            fn(x)
        t = time.perf_counter()
        for x in items:
            fn(x)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, initializer=_init) as pool:
            # Pool start-up and first imports are fixed costs, not per image: warm every worker.
            pool.map(fn, items[: 2 * workers], chunksize=1)
            t = time.perf_counter()
            for _ in pool.imap(fn, items, chunksize=8):
                pass
    return time.perf_counter() - t


class TreeRss:
    """Peak summed RSS of a process and all its descendants, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

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
            total = 0
            for p in self._tree():
                try:
                    for line in open(f"/proc/{p}/status"):
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop = True
        self._t.join()
        return self.peak


def folder_spec(root: Path, files: list[Path], workers: int) -> Path:
    """A fresh `root` with the files hard-linked into a folder source and a spec building it."""
    import yaml

    src = root / "images"
    shutil.rmtree(root, ignore_errors=True)
    src.mkdir(parents=True)
    for f in files:
        os.link(f, src / f.name)
    spec = {"name": "bench", "output_dir": str(root / "export"), "work_dir": str(root / "work"),
            "sources": [{"name": "folder", "kind": "folder", "path": str(src)}],
            "captions": {"landing_dir": str(root / "captions"), "selectors": ["sidecar"]},
            "image": {"workers": workers}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


def run_build(root: Path, files: list[Path], workers: int) -> tuple[float, int]:
    folder_spec(root, files, workers)
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home")}
    exe = os.path.join(os.path.dirname(sys.executable), "bucket-assets")
    t = time.perf_counter()
    proc = subprocess.Popen([exe, "build", "--spec", str(root / "spec.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRss(proc.pid)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - t
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {err.strip()[-500:]}")
    return elapsed, peak


def run_img2dataset(files: list[Path], workers: int, out: Path) -> tuple[float, int] | None:
    venv = Path("/tmp/img2dataset_venv")
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "img2dataset"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"img2dataset: skipped, it does not install here: {r.stderr.strip().splitlines()[-1:]}")
            return None
    served = files[0].parent
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=served,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        urls = out / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{f.name}\n" for f in files))
        t = time.perf_counter()
        r = subprocess.run([str(venv / "bin" / "img2dataset"), "--url_list", str(urls), "--output_folder", str(out / "o"),
                            "--image_size", "512", "--resize_mode", "center_crop", "--encode_quality", "95",
                            "--processes_count", str(workers), "--thread_count", "8", "--output_format", "files",
                            "--number_sample_per_shard", "1000", "--distributor", "multiprocessing", "--timeout", "30"],
                           capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            print(f"img2dataset: failed: {r.stderr.strip()[-400:]}")
            return None
        done = len(glob.glob(str(out / "o" / "*" / "*.jpg")))
        return elapsed, done
    finally:
        server.terminate()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--out", default="/tmp/bench_images")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--install-photos", action="store_true")
    ap.add_argument("--img2dataset", action="store_true")
    ap.add_argument("--build-sizes", default="200,1000")
    ap.add_argument("--memory-sizes", default="")
    ap.add_argument("--repeat", type=int, default=3, help="median of this many runs per measurement")
    args = ap.parse_args()
    root = Path(args.out)
    photos = photo_paths(args.install_photos)
    sizes = [int(x) for x in args.build_sizes.split(",") if x] + [int(x) for x in args.memory_sizes.split(",") if x]
    corpus = make_corpus(root / "corpus", max([args.images] + sizes), photos, args.workers)
    files = corpus[: args.images]
    print(f"photos: {len(photos)} from {os.path.dirname(photos[0])}; corpus {len(corpus)} JPEGs; measuring {len(files)}")

    store = root / "store"
    shutil.rmtree(store, ignore_errors=True)
    tasks = plan_tasks(files, store)
    n = len(tasks)
    from bucket_assets.core.processing import DCT_MARGIN, close_store_packs, render, render_profiled

    def fresh(fn, w):
        # A build writes new store files; overwriting old ones (unlink + discard on this disk)
        # would bill the benchmark for work a build does not do.
        close_store_packs()  # a build starts with no pack open (the 1-worker path renders in process)
        shutil.rmtree(store, ignore_errors=True)
        return timed_map(fn, tasks, w)

    res = {}
    for name, fn in (("floor simplejpeg", _floor_simplejpeg), ("floor pillow", _floor_pillow), ("product", render)):
        for w in sorted({1, args.workers}):
            res[(name, w)] = float(np.median([fresh(fn, w) for _ in range(args.repeat)]))
            print(f"{name:<18} {w} worker(s): {n / res[(name, w)]:7.1f} img/s  {1000 * res[(name, w)] / n:6.2f} ms/img", flush=True)
    steps: dict[str, float] = {}
    close_store_packs()
    shutil.rmtree(store, ignore_errors=True)
    for t in tasks:
        _, times = render_profiled(t)
        for k, v in times.items():
            steps[k] = steps.get(k, 0.0) + v
    print("product per step, 1 worker (ms/img): " + ", ".join(f"{k} {1000 * v / n:.2f}" for k, v in steps.items()))

    from bucket_assets.core.imaging import crop, decode_rgb, resize_cover, resize_cover_float

    psnrs = []
    for t in tasks[:50]:
        rgb = decode_rgb(Path(t.location).read_bytes(), 10**9)
        a = crop(resize_cover(rgb, t.resized_w, t.resized_h), t.crop_left, t.crop_top, t.target_w, t.target_h)
        b = crop(resize_cover_float(rgb, t.resized_w, t.resized_h), t.crop_left, t.crop_top, t.target_w, t.target_h)
        mse = np.mean((a.astype(np.float64) - b) ** 2)
        psnrs.append(99.0 if mse == 0 else 10 * math.log10(255**2 / mse))
    print(f"resize exactness vs float32 torch reference: min PSNR {min(psnrs):.1f} dB, median {np.median(psnrs):.1f} dB")

    import dataclasses

    approx = [dataclasses.replace(t, params=dataclasses.replace(t.params, dct_downscale=True)) for t in tasks]
    def fresh_approx():
        close_store_packs()
        shutil.rmtree(store, ignore_errors=True)
        return timed_map(render, approx, 1)

    t_approx = float(np.median([fresh_approx() for _ in range(args.repeat)]))
    psnr_a = []
    for t in tasks[:50]:
        data = Path(t.location).read_bytes()
        exact = crop(resize_cover(decode_rgb(data, 10**9, t.orientation), t.resized_w, t.resized_h),
                     t.crop_left, t.crop_top, t.target_w, t.target_h)
        fast = crop(resize_cover(decode_rgb(data, 10**9, t.orientation, (DCT_MARGIN * t.resized_w, DCT_MARGIN * t.resized_h)), t.resized_w,
                                 t.resized_h), t.crop_left, t.crop_top, t.target_w, t.target_h)
        mse = np.mean((exact.astype(np.float64) - fast) ** 2)
        psnr_a.append(99.0 if mse == 0 else 10 * math.log10(255**2 / mse))
    print(f"approximate mode (image.dct_downscale): {1000 * t_approx / n:.2f} ms/img on 1 worker "
          f"({res[('product', 1)] / t_approx:.2f}x exact); PSNR vs exact: min {min(psnr_a):.1f} dB, "
          f"median {np.median(psnr_a):.1f} dB")

    floor1 = res[("floor simplejpeg", 1)] / n
    prod1 = res[("product", 1)] / n
    print(f"stage / codec floor per image (1 worker): {prod1 / floor1:.2f}x; "
          f"scaling {args.workers} vs 1 worker: {res[('product', 1)] / res[('product', args.workers)]:.2f}x")

    if args.img2dataset:
        # Its steady state is a difference of two timings, so single estimates scatter widely:
        # report the median of `--repeat` pairs, and every pair.
        pairs = []
        for _ in range(args.repeat):
            quarter = run_img2dataset(files[: max(1, len(files) // 4)], args.workers, root / "i2d_q")
            full = run_img2dataset(files, args.workers, root / "i2d")
            if not (full and quarter):
                break
            pairs.append((full[1] / full[0], (full[1] - quarter[1]) / max(1e-9, full[0] - quarter[0])))
        if pairs:
            whole = float(np.median([p[0] for p in pairs]))
            steady = float(np.median([p[1] for p in pairs]))
            mine = n / res[("product", args.workers)]
            print(f"img2dataset {args.workers} procs: {whole:.1f} img/s over its whole run, {steady:.1f} img/s marginal "
                  f"(steady state; runs: {', '.join(f'{p[1]:.1f}' for p in pairs)}); product stage {mine:.1f} img/s = "
                  f"{mine / steady:.2f}x its steady state")

    builds = {}
    build_sizes = {int(x) for x in args.build_sizes.split(",") if x}
    for size in sizes:
        repeat = args.repeat if size in build_sizes else 1  # memory runs: once is enough
        runs = [run_build(root / f"build_{size}", corpus[:size], args.workers) for _ in range(repeat)]
        elapsed, peak = float(np.median([r[0] for r in runs])), max(r[1] for r in runs)
        builds[size] = (elapsed, peak)
        print(f"bucket-assets build {size:>6} images: {elapsed:7.1f}s, peak RSS of the process tree {peak / 2**20:7.0f} MB",
              flush=True)
    bs = [int(x) for x in args.build_sizes.split(",") if x]
    if len(bs) == 2:
        (s0, (t0, _)), (s1, (t1, _)) = sorted((s, builds[s]) for s in bs)
        marginal = (t1 - t0) / (s1 - s0)
        floor_w = res[("floor simplejpeg", args.workers)] / n
        print(f"build marginal cost {1000 * marginal:.2f} ms/img = {marginal / floor_w:.2f}x the codec floor on "
              f"{args.workers} worker(s); fixed start-up {t0 - s0 * marginal:.1f}s")
    ms = [int(x) for x in args.memory_sizes.split(",") if x]
    if len(ms) == 2:
        a, b = sorted(ms)
        print(f"peak memory {a}: {builds[a][1] / 2**20:.0f} MB, {b}: {builds[b][1] / 2**20:.0f} MB "
              f"({100 * (builds[b][1] / builds[a][1] - 1):+.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
