"""Benchmark (issue 13): the whole build at 10,000 / 100,000 (/ 1,000,000) images, from scratch and
incrementally, against the issue's scaling targets.

    python benchmarks/scale.py [--images 10000,100000] [--keep DIR] [--out results.json] [--no-fail]
    python benchmarks/scale.py --images +1000000 --keep /data/scale-corpus   # 10,000, 100,000 and 1,000,000

`--images` lists the sizes; a leading `+` adds them to the default 10,000,100,000. Without --keep
everything (corpus included) lives in a temporary directory removed at the end; with it the corpus
stays in DIR for the next run, and each size's run directory (DIR/runs/n<size>: src, spec, work,
export, DAGSTER_HOME, build logs) is removed when the size is done unless --keep-runs.

Corpus. Small real-photo crops: each sample is a random crop (random position and scale) of one
of the photographs scikit-image ships, resized to a random size with both sides in 160-260 px,
JPEG q88-92, written as LAION-style WebDataset tars of 10,000 samples each (<key>.jpg, <key>.txt
with the caption, <key>.json with key, caption, url, width, height, similarity, NSFW, status as
img2dataset writes them). Keys are the sample's global index (10 digits), so every tar has its own
ids. Deterministic: tar k's samples come from its own random stream (seed, k), so the same tar is
the same bytes in every run and a size that is not a multiple of 10,000 gets a last tar holding a
prefix of the next tar's stream. About 2 % of samples have a similarity under the 0.3 filter and
0.5 % are tagged NSFW, so every build has skips to account for. The tars are written one sample at
a time (never held in memory), one tar per worker process (--gen-workers, default all cores), into
--keep DIR/corpus-* where a later run reuses them (a tar is renamed into place only when complete).
A size's source directory hard-links the first tars of that pool.

Spec (one per size, in its own run directory): the webdataset source only (`src/*.tar`), captions
from the source (selectors [alt_text], an empty landing dir), buckets.base_resolutions [128],
divisible 8, image.workers 0 (all cores), shards.max_samples 1000, default filters.

Per size, in one run, on the same work dir / export / DAGSTER_HOME:
  a. clean: a fresh run directory (work dir, export and DAGSTER_HOME all new);
  b. noop: the same build again, nothing changed;
  c. add: one more tar of 10,000 new images (the next tar of the pool: ids no build has seen);
  d. remove: tar 00000 is taken out of the source (one of the original tars, not the one added
     in c; `--remove added` takes out the added one instead).
Before the sizes, a tiny clean build (--tiny, 200 images) measures the fixed start-up cost; it runs
--tiny-repeat times (3), each from scratch, and the median counts (the first pays for cold caches).

Per build: wall time of `bucket-assets build` (a subprocess, cwd = the run dir, DAGSTER_HOME of its
own); its CPU seconds (user + sys of the build and the descendants it waited for, from getrusage;
reported, no target); per-stage seconds from the run's event log in that instance
(`DagsterInstance.from_config(home).all_logs(run_id)`: STEP_START to STEP_SUCCESS of each step key;
`other` is filtered_images, bucket_assignments, the caption and download steps; `checks` the
asset-check steps; `pre`/`post` are the time from process start to RUN_START and from RUN_SUCCESS
to exit: interpreter, imports, definitions, instance); peak RSS of the build's process tree (the
sum of VmRSS over the build process and every descendant, read from /proc every 0.2 s; shared pages
count once per process, as RSS does; `procs` is the most processes seen in one sample, so worker
pools are visibly included), and the build process's own peak RSS per step (the coordinator, in
which the assets run: its growth with the dataset shows even where the workers make the tree's
peak; `coordinator_mb_by_step` in --out); `bucket-assets verify` of the export (every JPEG decoded; not included
in the wall time); the accounting identity images_seen == images_exported + every skipped_* +
decode_errors + encode_errors from manifest.json's summary, and images_seen == the samples in the
source tars now; the build's own counters from its materialization metadata (raw_index
units_scanned / units_reused / units_removed, processed_images run_rendered / run_reused,
bucket_shards run_shards_unchanged / run_shards_built / run_files_rewritten; n/a when the build
does not report them). Shard files (the paths the manifest lists) are stat'ed before and after
every rebuild: a shard whose content did not change (same path and sha256 in the old and new
manifest) must keep its inode and mtime; changed = sha256 differs or the path is new. After (d),
the keys in the export's shards (read from the tars' member names) must be exactly those before (d)
minus the removed tar's keys, the manifest's samples_exported must drop by exactly the number of
that tar's samples that were exported, and neither raw_index nor shard_samples in the metadata DB
(work_dir/metadata.duckdb) may hold any of its ids (n/a when a table is not there; the export's
shards still decide). After (c), the keys must be those before plus some ids of the added tar and
nothing else, and samples_exported must grow by exactly that many.

Targets (PASS/FAIL; exit 1 on any FAIL unless --no-fail). N0 is the smallest size (10,000), N1
the second (100,000), N2 a third (1,000,000):
  - peak RSS (max over the size's four builds): at N1 <= 1.10x that at N0, at N2 <= 1.25x, and
    every size under 1.5 GB;
  - no-op marginal cost: slope of the no-op wall time from the smallest to the largest size <= 3 %
    of the clean build's slope over the same sizes;
  - add: wall time of (c) at N1 (the issue's 100,000; the only size when there is one) <= 1.5x the
    clean build of one tar's worth of images (the clean build at 10,000; when no size equals the
    tar size, the start-up line's value there); the marginal-based figure, 10,000 x the clean
    slope, is reported alongside, and so is the ratio at a larger size (no verdict);
  - remove removes exactly its samples; every build's export verifies; the accounting identity
    holds for every build; unchanged shards keep inode and mtime after (b), (c) and (d);
  - clean marginal cost per image does not grow by more than 10 % from N0 to N1. Method: the
    marginal cost at a size is the slope of the clean wall time from the next smaller measured
    size, the tiny start-up build counting as the size below N0. So the cost at N0 is
    (T(N0) - T(tiny)) / (N0 - tiny), i.e. the per-image cost at N0 after subtracting the fixed
    start-up F = T(tiny) - tiny x that slope, and the cost at N1 is (T(N1) - T(N0)) / (N1 - N0).
    The averaged form, (T(N1) - F) / N1, is reported too. With N2, its slope from N1 is reported
    (no target). A clean slope that comes out zero or negative (a start-up build slowed by the
    machine) gives no verdict: the targets that divide by it FAIL with n/a, so rerun.

The machine is shared: a single run varies by about +-10 %, so a target near its limit is a
reason to rerun, not a verdict. Development: `--images 1000,3000 --per-tar 1000` (tars of 1,000;
the targets then read "10,000" as one tar's worth); `--shard-samples 10` makes buckets span several
shards at that size, so the inode/mtime check has unchanged shards to look at; `--from-json FILE`
re-evaluates a saved --out file. Needs what the build needs (this venv's `bucket-assets`) and
scikit-image's photos; no psutil.

Cost (2 cores): generating takes ~1.7 ms per image per core (1,000,000 in ~15 min); a sample is
~15 KB in the corpus and ~25 KB in a run (store + export), so 1,000,000 needs ~15 GB for the
corpus plus ~25 GB while its size runs. 10,000 + 100,000 with today's build: roughly 30-60 min.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS_VERSION = 1  # bump when the generator changes: a kept corpus of another version is not reused
STAGES = ("raw_index", "processed_images", "bucket_shards", "export_manifest", "dataset_card")
COUNTERS = {
    "raw_index": ("units_scanned", "units_reused", "units_removed"),
    "processed_images": ("run_rendered", "run_reused"),
    "bucket_shards": ("run_shards_unchanged", "run_shards_built", "run_files_rewritten"),
}
SEED_ERRORS = ("decode_errors", "encode_errors")
GB = 10**9
MB = 2**20


# Corpus ------------------------------------------------------------------------------------

_PHOTOS: dict = {}


def _photos():
    if not _PHOTOS:
        from bucket_assets.sample import PHOTOS, load_photos

        for name, img in load_photos().items():
            _PHOTOS[name] = (img, PHOTOS[name])
    return _PHOTOS


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def sample_key(per_tar: int, tar_idx: int, i: int) -> str:
    return f"{tar_idx * per_tar + i:010d}"


def _write_tar(job: tuple) -> int:
    """Tar `tar_idx` of the pool (its first `count` samples), streamed to `path`."""
    import numpy as np
    from PIL import Image

    path, tar_idx, count, per_tar, seed = job
    photos = _photos()
    names = sorted(photos)
    rng = np.random.default_rng([seed, tar_idx])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(count):
            key = sample_key(per_tar, tar_idx, i)
            name = names[int(rng.integers(len(names)))]
            img, desc = photos[name]
            W, H = img.size
            w, h = (int(x) for x in rng.integers(160, 261, size=2))
            fmax = min(W / w, H / h)  # every photo is at least 300 px a side
            f_ = math.exp(rng.uniform(0.0, math.log(fmax)))
            cw, ch = w * f_, h * f_
            left, top = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
            piece = img.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch), reducing_gap=2.0)
            if rng.uniform() < 0.5:
                piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            piece.save(buf, "JPEG", quality=int(rng.integers(88, 93)))
            u = rng.uniform()
            sim = round(float(rng.uniform(0.2, 0.29) if u < 0.02 else rng.uniform(0.3, 0.45)), 4)
            nsfw = "NSFW" if rng.uniform() < 0.005 else "UNLIKELY"
            caption = f"{desc.capitalize()}, photo {key}"
            meta = {"key": key, "caption": caption, "url": f"https://example.com/scale/{key}.jpg", "width": w,
                    "height": h, "original_width": w, "original_height": h, "similarity": sim, "NSFW": nsfw,
                    "status": "success"}
            _member(tf, f"{key}.jpg", buf.getvalue())
            _member(tf, f"{key}.txt", caption.encode())
            _member(tf, f"{key}.json", json.dumps(meta).encode())
    os.replace(tmp, path)
    return count


class Corpus:
    """The pool of tars under `root`: full tars `NNNNN.tar` and prefixes `NNNNN-<count>.tar`."""

    def __init__(self, root: Path, per_tar: int, seed: int, workers: int):
        self.dir = root / f"corpus-v{CORPUS_VERSION}-p{per_tar}-s{seed}"
        self.per_tar, self.seed, self.workers = per_tar, seed, workers
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, idx: int, count: int) -> Path:
        return self.dir / (f"{idx:05d}.tar" if count == self.per_tar else f"{idx:05d}-{count}.tar")

    def layout(self, n: int) -> list[tuple[int, int]]:
        """(tar index, samples) of a corpus of n samples."""
        full, rest = divmod(n, self.per_tar)
        return [(i, self.per_tar) for i in range(full)] + ([(full, rest)] if rest else [])

    def ensure(self, tars: list[tuple[int, int]]) -> float:
        for p in self.dir.glob("*.tmp-*"):  # a killed generation's leftovers
            p.unlink()
        todo = sorted({(i, c) for i, c in tars if not self.path(i, c).is_file()})
        if not todo:
            return 0.0
        t = time.perf_counter()
        jobs = [(str(self.path(i, c)), i, c, self.per_tar, self.seed) for i, c in todo]
        total = sum(c for _, c in todo)
        print(f"generating {total:,} images in {len(todo)} tar(s) with {self.workers} process(es) under {self.dir}",
              flush=True)
        done = 0
        if self.workers <= 1 or len(jobs) == 1:
            for j in jobs:
                done += _write_tar(j)
        else:
            with ProcessPoolExecutor(self.workers) as pool:
                for c in pool.map(_write_tar, jobs):
                    done += c
                    if len(jobs) > 4:
                        print(f"  {done:,}/{total:,} images ({time.perf_counter() - t:.0f}s)", flush=True)
        el = time.perf_counter() - t
        print(f"generated {total:,} images in {el:.1f}s ({total / el:.0f} img/s)", flush=True)
        return el


# Measuring a build -------------------------------------------------------------------------

class TreeRss:
    """Peak summed VmRSS of a process and all its descendants, sampled every `interval` s from /proc."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak = self.max_procs = self.procs_at_peak = self.samples = 0
        self.at_peak: list[str] = []
        self.root_trace: list[tuple[float, int]] = []  # (time, VmRSS of the build process itself): by step
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def _sample(self) -> None:
        total = 0
        seen: list[tuple[int, int]] = []
        for p in self._tree():
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):  # absent for a zombie
                            rss = int(line.split()[1]) * 1024
                            total += rss
                            seen.append((p, rss))
                            break
            except OSError:
                pass
        self.samples += 1
        self.root_trace += [(time.time(), rss) for p, rss in seen if p == self.pid]
        self.max_procs = max(self.max_procs, len(seen))
        if total > self.peak:
            self.peak, self.procs_at_peak = total, len(seen)
            self.at_peak = []  # which processes made the peak: name and MB
            for p, rss in seen:
                try:
                    with open(f"/proc/{p}/comm") as f:
                        self.at_peak.append(f"{f.read().strip()} {rss / MB:.0f}")
                except OSError:
                    pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKET_ASSETS_")}
    env["DAGSTER_HOME"] = str(home)
    return env


def read_run(home: Path, run_id: str | None) -> dict:
    """Per-step seconds, run start/end, materialization metadata and check results of a run."""
    import dagster as dg

    out: dict = {"steps": {}, "materialized": {}, "checks": {}, "run_start": None, "run_end": None}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        if run_id is None:
            runs = instance.get_runs(limit=1)
            if not runs:
                return out
            run_id = runs[0].run_id
        out["run_id"] = run_id
        start: dict[str, float] = {}
        end: dict[str, float] = {}
        check_steps: set[str] = set()
        mat_steps: set[str] = set()
        ET = dg.DagsterEventType
        for e in instance.all_logs(run_id):
            de = e.dagster_event
            if de is None:
                continue
            t = de.event_type
            if t == ET.STEP_START:
                start.setdefault(e.step_key, e.timestamp)
            elif t in (ET.STEP_SUCCESS, ET.STEP_FAILURE, ET.STEP_SKIPPED):
                end[e.step_key] = e.timestamp
            elif t == ET.RUN_START:  # its value is still "PIPELINE_START"
                out["run_start"] = e.timestamp
            elif t in (ET.RUN_SUCCESS, ET.RUN_FAILURE):
                out["run_end"] = e.timestamp
            elif t == ET.ASSET_MATERIALIZATION:
                mat = de.event_specific_data.materialization
                asset = mat.asset_key.path[-1]
                mat_steps.add(e.step_key)
                md = out["materialized"].setdefault(asset, {})
                # Partitioned assets: the run-wide numbers are on every partition's event; the
                # first event's value is kept. Numbers and short strings only (no tables, cards).
                for k, v in mat.metadata.items():
                    val = getattr(v, "value", v)
                    if k not in md and (isinstance(val, (int, float, bool)) or (isinstance(val, str) and len(val) < 120)):
                        md[k] = val
            elif t == ET.ASSET_CHECK_EVALUATION:
                data = de.event_specific_data
                out["checks"][data.check_name] = bool(data.passed)
                check_steps.add(e.step_key)
        for k, s in start.items():
            if k in end:
                out["steps"][k] = end[k] - s
        out["spans"] = {k: (s, end[k]) for k, s in start.items() if k in end}
        out["check_steps"] = sorted(check_steps - mat_steps)
    return out


def stage_times(run: dict) -> dict[str, float]:
    st = {s: 0.0 for s in STAGES + ("checks", "other")}
    for k, v in run["steps"].items():
        if k in STAGES:
            st[k] += v
        elif k in run.get("check_steps", ()):
            st["checks"] += v
        else:
            st["other"] += v
    return st


def shard_stats(export: Path, m: dict | None) -> dict[str, tuple[int, int, int]]:
    """manifest path -> (inode, mtime_ns, size) of every shard file the manifest lists."""
    out = {}
    for rel in manifest_shas(m):
        try:
            st = os.stat(export / rel)
        except OSError:
            continue
        out[rel] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def manifest_shas(m: dict | None) -> dict[str, str]:
    if not m:
        return {}
    return {sh["path"]: sh["sha256"] for b in m.get("buckets", {}).values() for sh in b.get("shards", [])}


def exported_keys(export: Path, m: dict | None) -> set[str]:
    """Keys of the samples in the manifest's shards, from the tars' .jpg member names."""
    keys: set[str] = set()
    for rel in manifest_shas(m):
        with tarfile.open(export / rel) as tf:
            for ti in tf:
                if ti.name.endswith(".jpg"):
                    keys.add(ti.name[:-4])
    return keys


def read_manifest(export: Path) -> dict | None:
    try:
        return json.loads((export / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def accounting(summary: dict, corpus_samples: int) -> dict:
    skips = {k: v for k, v in summary.items()
             if (k.startswith("skipped_") or k in SEED_ERRORS) and isinstance(v, int) and not isinstance(v, bool)}
    seen, exported = summary.get("images_seen"), summary.get("images_exported")
    ok = (isinstance(seen, int) and isinstance(exported, int) and seen == exported + sum(skips.values())
          and seen == corpus_samples)
    return {"ok": ok, "images_seen": seen, "images_exported": exported, "samples_exported": summary.get("samples_exported"),
            "skips": skips, "corpus_samples": corpus_samples}


def compare_shards(before_stat, before_m, after_stat, after_m) -> dict:
    old, new = manifest_shas(before_m), manifest_shas(after_m)
    unchanged = [p for p, sha in new.items() if old.get(p) == sha]
    moved = [p for p in unchanged if before_stat.get(p, (None,))[:2] != after_stat.get(p, (None,))[:2]]
    return {"shards": len(new), "unchanged": len(unchanged), "unchanged_touched": len(moved),
            "touched_examples": moved[:5], "changed": sum(1 for p, sha in new.items() if p in old and old[p] != sha),
            "new": sum(1 for p in new if p not in old), "gone": sum(1 for p in old if p not in new),
            "ok": not moved}


class Run:
    """One size's run directory: source links, spec, work dir, export, DAGSTER_HOME."""

    def __init__(self, root: Path, corpus: Corpus, tars: list[tuple[int, int]], exe: str, shard_samples: int = 1000):
        self.root, self.corpus, self.exe = root, corpus, exe
        shutil.rmtree(root, ignore_errors=True)
        self.src = root / "src"
        self.export, self.work, self.home = root / "export", root / "work", root / "dagster_home"
        self.src.mkdir(parents=True)
        (root / "captions").mkdir()
        self.tars: dict[int, int] = {}
        for i, c in tars:
            self.add_tar(i, c)
        import yaml

        spec = {
            "name": "scale",
            "output_dir": "export",
            "work_dir": "work",
            "sources": [{"name": "laion", "kind": "webdataset", "paths": ["src/*.tar"], "caption_variant": "alt_text"}],
            "buckets": {"base_resolutions": [128], "divisible": 8},
            "image": {"workers": 0},
            "captions": {"landing_dir": "captions", "selectors": ["alt_text"]},
            "shards": {"max_samples": shard_samples},
        }
        self.spec = root / "spec.yaml"
        self.spec.write_text(yaml.safe_dump(spec, sort_keys=False))
        self.n_builds = 0

    def add_tar(self, idx: int, count: int) -> None:
        dst = self.src / f"{idx:05d}.tar"
        try:
            os.link(self.corpus.path(idx, count), dst)
        except OSError:
            shutil.copyfile(self.corpus.path(idx, count), dst)
        self.tars[idx] = count

    def remove_tar(self, idx: int) -> int:
        (self.src / f"{idx:05d}.tar").unlink()
        return self.tars.pop(idx)

    @property
    def samples(self) -> int:
        return sum(self.tars.values())

    def build(self, label: str, verify: bool = True) -> dict:
        self.n_builds += 1
        log = self.root / f"build-{self.n_builds}-{label}.log"
        with open(log, "w") as lf:
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t_epoch, t = time.time(), time.perf_counter()
            proc = subprocess.Popen([self.exe, "build", "--spec", str(self.spec)], cwd=self.root,
                                    env=_clean_env(self.home), stdout=subprocess.PIPE, stderr=lf, text=True)
            rss = TreeRss(proc.pid)
            stdout, _ = proc.communicate()
            wall = time.perf_counter() - t
            t_end = time.time()
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            rss.stop()
            lf.write(stdout)
        res: dict = {"label": label, "corpus_samples": self.samples, "tars": len(self.tars), "rc": proc.returncode,
                     "wall_s": wall, "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                     "peak_rss": rss.peak, "rss_procs_max": rss.max_procs,
                     "rss_procs_at_peak": rss.procs_at_peak, "rss_at_peak_mb": rss.at_peak, "rss_samples": rss.samples,
                     "log": str(log)}
        if proc.returncode != 0:
            res["error"] = (log.read_text().strip().splitlines() or ["?"])[-1][-400:]
        m = re.search(r"\(run ([0-9a-f-]{36})", stdout + (res.get("error") or ""))
        try:
            run = read_run(self.home, m.group(1) if m else None)
        except Exception as exc:  # noqa: BLE001 - the numbers below are then n/a, the build is still measured
            run = {"steps": {}, "materialized": {}, "checks": {}, "run_start": None, "run_end": None,
                   "error": f"{type(exc).__name__}: {exc}"}
        res["run_id"] = run.get("run_id")
        res["steps"] = run["steps"]
        res["stages"] = stage_times(run)
        # The build process's own peak per step (the coordinator: assets run in it, workers are
        # its children), so memory that follows the dataset shows even under the workers' peak.
        res["coordinator_mb_by_step"] = {
            k: round(max((m for t, m in rss.root_trace if s0 <= t <= s1), default=0) / MB)
            for k, (s0, s1) in run.get("spans", {}).items()}
        res["coordinator_peak_mb"] = round(max((m for _, m in rss.root_trace), default=0) / MB)
        res["pre_s"] = run["run_start"] - t_epoch if run["run_start"] else None
        res["post_s"] = t_end - run["run_end"] if run["run_end"] else None
        res["asset_checks"] = run["checks"]
        res["counters"] = {a: {k: run["materialized"].get(a, {}).get(k) for k in ks} for a, ks in COUNTERS.items()}
        res["metadata"] = run["materialized"]
        manifest = read_manifest(self.export)
        res["accounting"] = accounting((manifest or {}).get("summary") or {}, self.samples)
        if verify and proc.returncode == 0:
            t = time.perf_counter()
            v = subprocess.run([self.exe, "verify", str(self.export)], cwd=self.root, env=_clean_env(self.home),
                               capture_output=True, text=True)
            res["verify"] = {"ok": v.returncode == 0, "s": time.perf_counter() - t,
                             "message": (v.stdout.strip() or v.stderr.strip())[-300:]}
        else:
            res["verify"] = {"ok": False, "s": None, "message": "build failed" if proc.returncode else "not run"}
        return res

    def db_count(self, table: str, ids: list[str]) -> int | None:
        """Rows of `table` whose image_id is one of `ids` (None when the table cannot be read)."""
        try:
            import duckdb
            import pyarrow as pa

            con = duckdb.connect(str(self.work / "metadata.duckdb"), read_only=True)
            try:
                con.register("gone_ids", pa.table({"image_id": ids}))
                return int(con.execute(f"SELECT count(*) FROM {table} WHERE image_id IN (SELECT image_id FROM gone_ids)")
                           .fetchone()[0])
            finally:
                con.close()
        except Exception:  # noqa: BLE001
            return None


def measure_size(run: Run, n: int, corpus: Corpus, remove: str, log, out: dict) -> dict:
    """Builds a-d of one size into out["builds"] (filled as they finish, so a crash keeps them)."""
    b = out.setdefault("builds", {})

    def done(r: dict) -> bool:
        st = r["stages"]
        log(f"  {n:>9,} {r['label']:<6} {r['wall_s']:8.1f}s  rss {r['peak_rss'] / MB:6.0f} MB ({r['rss_procs_max']} procs)"
            f"  verify {'ok' if r['verify']['ok'] else 'FAILED'}  identity {'ok' if r['accounting']['ok'] else 'FAILED'}"
            f"  [raw {st['raw_index']:.1f} img {st['processed_images']:.1f} shards {st['bucket_shards']:.1f}"
            f" manifest {st['export_manifest']:.1f} card {st['dataset_card']:.1f} checks {st['checks']:.1f}"
            f" other {st['other']:.1f} pre {r['pre_s'] or 0:.1f}]"
            f"  coordinator {r['coordinator_peak_mb']} MB"
            f" (max in {max(r['coordinator_mb_by_step'], key=r['coordinator_mb_by_step'].get, default='-')})"
            + (f"  ERROR {r['error']}" if r.get("error") else ""))
        return r["rc"] == 0

    def snapshot():
        m = read_manifest(run.export)
        return shard_stats(run.export, m), m

    b["clean"] = r = run.build("clean")
    if not done(r):
        return out
    before = snapshot()
    b["noop"] = r = run.build("noop")
    r["shards"] = compare_shards(*before, *snapshot())
    if not done(r):
        return out

    before = snapshot()
    keys_before = exported_keys(run.export, before[1])
    added = max(run.tars) + 1
    corpus.ensure([(added, corpus.per_tar)])
    run.add_tar(added, corpus.per_tar)
    b["add"] = r = run.build("add")
    after = snapshot()
    r["shards"] = compare_shards(*before, *after)
    r["added_tar"] = added
    if not done(r):
        return out
    keys_after = exported_keys(run.export, after[1])
    added_keys = {sample_key(corpus.per_tar, added, i) for i in range(corpus.per_tar)}
    new = keys_after - keys_before
    gain = ((after[1] or {}).get("summary", {}).get("samples_exported", 0)
            - (before[1] or {}).get("summary", {}).get("samples_exported", 0))
    r["keys"] = {"before": len(keys_before), "after": len(keys_after), "new": len(new), "manifest_gain": gain,
                 "new_outside_added_tar": len(new - added_keys), "lost": len(keys_before - keys_after),
                 "ok": keys_before <= keys_after and new <= added_keys and gain == len(new) and bool(new)}

    before = snapshot()
    keys_before = keys_after
    gone = 0 if remove == "first" else added
    gone_count = run.tars[gone]
    gone_keys = {sample_key(corpus.per_tar, gone, i) for i in range(gone_count)}
    run.remove_tar(gone)
    b["remove"] = r = run.build("remove")
    after = snapshot()
    r["shards"] = compare_shards(*before, *after)
    r["removed_tar"] = gone
    if not done(r):
        return out
    keys_after = exported_keys(run.export, after[1])
    expected = keys_before - gone_keys
    had = len(keys_before & gone_keys)
    drop = ((before[1] or {}).get("summary", {}).get("samples_exported", 0)
            - (after[1] or {}).get("summary", {}).get("samples_exported", 0))
    ids = sorted(gone_keys)
    r["keys"] = {"before": len(keys_before), "after": len(keys_after), "removed_tar_samples": gone_count,
                 "removed_tar_exported": had, "manifest_drop": drop,
                 "left_in_export": len(keys_after & gone_keys), "others_lost": len(expected - keys_after),
                 "unexpected": len(keys_after - expected),
                 "left_in_raw_index": run.db_count("raw_index", ids),
                 "left_in_shard_samples": run.db_count("shard_samples", ids)}
    k = r["keys"]
    k["ok"] = (keys_after == expected and drop == had and not k["left_in_raw_index"]
               and not k["left_in_shard_samples"])
    return out


# Targets -----------------------------------------------------------------------------------

def slope(t0: float, n0: int, t1: float, n1: int) -> float:
    return (t1 - t0) / (n1 - n0)


def evaluate(res: dict) -> list[dict]:
    """The issue's targets: name, measured, limit, PASS/FAIL (FAIL also when a number is missing).
    Derived numbers (slopes, start-up) go into res["derived"]."""
    sizes = sorted(int(s) for s in res["sizes"])
    per_tar, tiny = res["per_tar"], res["tiny"]
    S = {int(k): v["builds"] for k, v in res["sizes"].items()}
    d = res["derived"] = {}
    targets: list[dict] = []

    tinies = res.get("tiny_builds") or []

    def wall(n: int, label: str) -> float | None:
        if n == tiny and label == "clean":  # the median of the start-up builds
            ts = sorted(r["wall_s"] for r in tinies if r["rc"] == 0)
            return ts[len(ts) // 2] if ts and len(ts) == len(tinies) else None
        r = S.get(n, {}).get(label)
        return r["wall_s"] if r and r["rc"] == 0 else None

    def peak(n: int) -> int | None:
        bs = list(S[n].values())
        return max(r["peak_rss"] for r in bs) if len(bs) == 4 and all(r["rc"] == 0 for r in bs) else None

    def add(name: str, ok: bool, shown: str) -> None:
        targets.append({"target": name, "pass": None if ok is None else bool(ok), "shown": shown})

    def num(fmt: str, *vs) -> str:
        return "n/a" if any(v is None for v in vs) else fmt.format(*vs)

    # Memory.
    n0 = sizes[0]
    p0 = peak(n0)
    for i, n in enumerate(sizes):
        p = peak(n)
        add(f"peak RSS at {n:,} < 1.5 GB", p is not None and p < 1.5 * GB, num("{:.0f} MB", p and p / MB))
        if i:
            lim = 1.10 if i == 1 else 1.25
            ratio = p / p0 if p and p0 else None
            add(f"peak RSS at {n:,} <= {lim:.2f}x that at {n0:,}", ratio is not None and ratio <= lim,
                num("{:.3f}x ({:.0f} vs {:.0f} MB)", ratio, p and p / MB, p0 and p0 / MB))

    # Clean slopes: from the next smaller measured size, the tiny build below the first.
    t_tiny = wall(tiny, "clean")
    marg: dict[int, float | None] = {}
    prev = tiny
    for n in sizes:
        a, b = wall(prev, "clean"), wall(n, "clean")
        marg[n] = slope(a, prev, b, n) if a is not None and b is not None else None
        prev = n
    d["clean_marginal_s_per_img"] = {str(n): v for n, v in marg.items()}
    fixed = t_tiny - tiny * marg[n0] if marg[n0] is not None else None
    d["startup_s"] = fixed
    lo, hi = sizes[0], sizes[-1]
    cs = zs = None
    if hi != lo:
        c0, c1, z0, z1 = wall(lo, "clean"), wall(hi, "clean"), wall(lo, "noop"), wall(hi, "noop")
        if None not in (c0, c1):
            cs = slope(c0, lo, c1, hi)
        if None not in (z0, z1):
            zs = slope(z0, lo, z1, hi)
        ratio = zs / cs if zs is not None and cs and cs > 0 else None  # cs <= 0 is noise: no verdict
        add(f"no-op marginal cost <= 3 % of the clean build's ({lo:,} to {hi:,})", ratio is not None and ratio <= 0.03,
            num("{:.2f} % ({:.3f} vs {:.3f} ms/img)", ratio and 100 * ratio, zs and 1e3 * zs, cs and 1e3 * cs)
            if ratio is not None else num("n/a: the clean slope is not positive ({:.3f} ms/img), rerun", cs and 1e3 * cs))
    d["clean_slope_s_per_img"], d["noop_slope_s_per_img"] = cs, zs
    for label in ("clean", "noop"):  # the same slopes in CPU seconds (no target)
        r0, r1 = S.get(lo, {}).get(label), S.get(hi, {}).get(label)
        if hi != lo and r0 and r1 and r0.get("cpu_s") is not None and r1.get("cpu_s") is not None:
            d[f"{label}_cpu_slope_s_per_img"] = slope(r0["cpu_s"], lo, r1["cpu_s"], hi)

    # Adding one tar vs a clean build of that many images: the issue sets the target at 100,000
    # (the second size); a larger size's ratio is reported without a verdict.
    ref = wall(per_tar, "clean") if per_tar in S else (fixed + per_tar * marg[n0] if fixed is not None else None)
    base = cs if cs is not None else marg[n0]
    by_slope = per_tar * base if base is not None and base > 0 else None
    at = sizes[1] if len(sizes) > 1 else sizes[0]
    d["add_s"] = {str(n): wall(n, "add") for n in sizes}
    d["add_ref_clean_s"], d["add_ref_marginal_s"], d["add_target_size"] = ref, by_slope, at
    for n in sizes[sizes.index(at):]:
        a = wall(n, "add")
        ratio = a / ref if a is not None and ref else None
        shown = (num("{:.2f}x ({:.1f}s vs {:.1f}s)", ratio, a, ref)
                 + (num("; vs {:,} x the clean slope = {:.1f}s: {:.2f}x", per_tar, by_slope, a and by_slope and a / by_slope)
                    if by_slope else "; the clean slope is not positive, no marginal-based figure"))
        if n == at:
            add(f"adding {per_tar:,} images to {n:,} <= 1.5x a clean build of {per_tar:,}",
                ratio is not None and ratio <= 1.5, shown)
        else:
            add(f"adding {per_tar:,} images to {n:,} vs a clean build of {per_tar:,} (reported; the target is at {at:,})",
                None, shown)

    # Correctness.
    def per_size(label: str, part: str, fmt) -> tuple[bool, str]:
        """Whether every size's build `label` has r[part]["ok"], and each size's figure."""
        rs = [(n, S[n].get(label)) for n in sizes]
        ok = all(r is not None and r.get(part, {}).get("ok") for _, r in rs)
        return ok, "; ".join(f"{n:,}: " + ("n/a" if not r or part not in r else fmt(r[part])) for n, r in rs)

    add("removing a tar removes exactly its samples", *per_size(
        "remove", "keys", lambda k: f"-{k['manifest_drop']:,} of its {k['removed_tar_exported']:,} exported, "
                                    f"{k['left_in_export']} left, {k['others_lost']} others lost; in the DB "
                                    f"raw_index {_c(k['left_in_raw_index'])}, shard_samples {_c(k['left_in_shard_samples'])}"))
    add("adding a tar adds only its samples, loses none", *per_size(
        "add", "keys", lambda k: f"+{k['new']:,} (manifest +{k['manifest_gain']:,}), "
                                 f"{k['new_outside_added_tar']} foreign, {k['lost']} lost" if "manifest_gain" in k
        else f"+{k['new']:,}, {k['lost']} lost"))
    builds = (tinies or [None]) + [S[n].get(lb) for n in sizes for lb in ("clean", "noop", "add", "remove")]
    done = [r for r in builds if r is not None]
    add("every export verifies", len(done) == len(builds) and all(r["verify"]["ok"] for r in done),
        f"{sum(r['verify']['ok'] for r in done)}/{len(builds)} builds")
    add("images_seen == exported + skips, == the source's samples, every build",
        len(done) == len(builds) and all(r["accounting"]["ok"] for r in done),
        f"{sum(r['accounting']['ok'] for r in done)}/{len(builds)} builds")
    for label in ("noop", "add", "remove"):
        add(f"unchanged shards keep inode and mtime ({label})", *per_size(
            label, "shards", lambda h: f"{h['unchanged'] - h['unchanged_touched']}/{h['unchanged']} kept"
                                       f" ({h['changed']} changed, {h['new']} new)"))

    # Marginal cost growth.
    if len(sizes) >= 2:
        n1 = sizes[1]
        # A slope that is not positive is noise (a slow start-up build), not a cost: no verdict.
        pos = marg[n0] is not None and marg[n0] > 0 and marg[n1] is not None and marg[n1] > 0
        g = marg[n1] / marg[n0] - 1 if pos else None
        c1 = wall(n1, "clean")
        avg = (c1 - fixed) / n1 if c1 is not None and fixed is not None else None
        d["per_image_after_startup_s"] = {str(n0): marg[n0], str(n1): avg}
        add(f"clean marginal cost growth {n0:,} to {n1:,} <= 10 %", g is not None and g <= 0.10,
            (num("{:+.1f} %", g and 100 * g) if g is not None else "n/a (a slope is not positive: rerun)")
            + num(" ({:.3f} -> {:.3f} ms/img", marg[n0] and 1e3 * marg[n0], marg[n1] and 1e3 * marg[n1])
            + num("; averaged over {:,} after {:.1f}s start-up: {:.3f} ms/img", n1, fixed, avg and 1e3 * avg)
            + (num(", {:+.1f} %", 100 * (avg / marg[n0] - 1)) if pos and avg and avg > 0 else "") + ")")
        for n in sizes[2:]:
            g2 = marg[n] / marg[n0] - 1 if marg[n0] and marg[n0] > 0 and marg[n] and marg[n] > 0 else None
            d.setdefault("marginal_growth", {})[str(n)] = g2
    return targets


# Report ------------------------------------------------------------------------------------

def _c(v) -> str:
    return "n/a" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _f(v, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def build_table(res: dict) -> str:
    """Every build: wall and stage seconds, memory, checks, shard reuse and the build's counters."""
    head = ["images", "build", "wall s", "cpu s", *STAGES, "checks", "other", "pre+post", "peak RSS MB (procs)",
            "verify", "identity", "shards untouched/unchanged, changed, new, gone", "units scanned/reused/removed",
            "rendered/reused", "shards unchanged/built, files rewritten"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = res["tiny_builds"] + [r for _, s in sorted(res["sizes"].items(), key=lambda x: int(x[0]))
                                  for r in s["builds"].values()]
    for r in rows:
        st = r["stages"]
        sh = r.get("shards")
        c = r["counters"]
        pp = (r["pre_s"] or 0) + (r["post_s"] or 0) if r["pre_s"] is not None else None
        cells = [f"{r['corpus_samples']:,}", r["label"], f"{r['wall_s']:.1f}", _f(r.get("cpu_s")),
                 *(f"{st[s]:.1f}" for s in STAGES),
                 f"{st['checks']:.1f}", f"{st['other']:.1f}", _f(pp), f"{r['peak_rss'] / MB:.0f} ({r['rss_procs_max']})",
                 "ok" if r["verify"]["ok"] else "FAIL", "ok" if r["accounting"]["ok"] else "FAIL",
                 (f"{sh['unchanged'] - sh['unchanged_touched']}/{sh['unchanged']}, {sh['changed']}, {sh['new']}, "
                  f"{sh['gone']}") if sh else "",
                 "/".join(_c(v) for v in c["raw_index"].values()), "/".join(_c(v) for v in c["processed_images"].values()),
                 f"{_c(c['bucket_shards']['run_shards_unchanged'])}/{_c(c['bucket_shards']['run_shards_built'])}, "
                 f"{_c(c['bucket_shards']['run_files_rewritten'])}"]
        if r["rc"] != 0:
            cells[2] += f" (failed: {r.get('error', '')[:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(res: dict) -> str:
    """README-style `| what | measured |` rows."""
    sizes = sorted(int(n) for n in res["sizes"])
    d = res["derived"]
    B = {int(n): s["builds"] for n, s in res["sizes"].items()}

    def w(n, lb):
        r = B[n].get(lb)
        return f"{r['wall_s']:.1f} s" if r and r["rc"] == 0 else "n/a"

    marg = d.get("clean_marginal_s_per_img", {})
    rows = [
        ("clean build", "; ".join(f"{n:,}: {w(n, 'clean')}" for n in sizes)
         + f"; marginal {' -> '.join(_f(marg.get(str(n)) and 1e3 * marg[str(n)], '{:.2f}') for n in sizes)} ms/img"
         + f" (from {res['tiny']:,}, then between sizes), start-up {_f(d.get('startup_s'))} s"),
        ("no-op rebuild", "; ".join(f"{n:,}: {w(n, 'noop')}" for n in sizes)
         + (f"; marginal {_f(d.get('noop_slope_s_per_img') and 1e3 * d['noop_slope_s_per_img'], '{:.3f}')} ms/img"
            if len(sizes) > 1 else "")),
        ("CPU seconds per marginal image (clean, no-op)",
         f"{_f(d.get('clean_cpu_slope_s_per_img') and 1e3 * d['clean_cpu_slope_s_per_img'], '{:.2f} ms')}, "
         f"{_f(d.get('noop_cpu_slope_s_per_img') and 1e3 * d['noop_cpu_slope_s_per_img'], '{:.3f} ms')} "
         f"({sizes[0]:,} to {sizes[-1]:,})"),
        (f"add one tar ({res['per_tar']:,} new images)",
         "; ".join(f"to {n:,}: {w(n, 'add')}" for n in sizes)
         + f"; a clean build of {res['per_tar']:,}: {_f(d.get('add_ref_clean_s'))} s"),
        (f"remove tar {'00000' if res['remove'] == 'first' else 'added in c'}",
         "; ".join(f"from {n + res['per_tar']:,}: {w(n, 'remove')}" for n in sizes)),
        ("peak RSS of the build's process tree (max of a-d)",
         "; ".join(f"{n:,}: " + (f"{max(r['peak_rss'] for r in B[n].values()) / MB:.0f} MB" if B[n] else "n/a")
                   for n in sizes)
         + f"; {res['tiny']:,}: {max(r['peak_rss'] for r in res['tiny_builds']) / MB:.0f} MB"),
    ]
    lines = ["| what | measured |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def report(res: dict, targets: list[dict]) -> str:
    lines = [build_table(res), "", summary_table(res), "", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['shown']} | {'reported' if t['pass'] is None else 'PASS' if t['pass'] else 'FAIL'} |"
              for t in targets]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="10000,100000",
                    help="corpus sizes, comma-separated; +N,... adds sizes to the default (+1000000)")
    ap.add_argument("--keep", metavar="DIR", help="cache the generated corpus under DIR (reused by later runs)")
    ap.add_argument("--out", help="write every raw number as JSON to this file")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when a target fails")
    ap.add_argument("--tiny", type=int, default=200, help="images in the start-up build")
    ap.add_argument("--tiny-repeat", type=int, default=3, help="start-up builds (the median counts; the first warms caches)")
    ap.add_argument("--remove", choices=("first", "added"), default="first",
                    help="the tar taken out in step d: tar 00000 (default) or the one added in step c")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep-runs", action="store_true", help="keep each size's run dir (work, export, logs)")
    ap.add_argument("--per-tar", type=int, default=10_000, help=argparse.SUPPRESS)  # development: smaller tars
    ap.add_argument("--shard-samples", type=int, default=1000, help=argparse.SUPPRESS)  # development: shards.max_samples
    ap.add_argument("--from-json", help=argparse.SUPPRESS)  # development: re-evaluate a saved --out file
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        if "tiny_build" in res:  # written before the start-up build was repeated
            res["tiny_builds"] = [res.pop("tiny_build")]
        return finish(res, args)
    spec_sizes = args.images.strip()
    if spec_sizes.startswith("+"):
        spec_sizes = "10000,100000," + spec_sizes[1:]
    try:
        sizes = sorted({int(x.replace("_", "")) for x in spec_sizes.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--images {args.images}: expected sizes like 10000,100000 or +1000000")
    if args.tiny_repeat < 1 or args.per_tar < 1:
        ap.error("--tiny-repeat and --per-tar must be at least 1")
    if not sizes or args.tiny <= 0 or args.tiny >= sizes[0]:
        ap.error("--images needs at least one size, each above --tiny")
    exe = os.path.join(os.path.dirname(sys.executable), "bucket-assets")
    if not os.path.exists(exe):
        ap.error(f"{exe} not found: run this with the project's venv python")

    tmp = None
    if args.keep:
        base = Path(args.keep).resolve()
    else:
        base = Path(tmp := tempfile.mkdtemp(prefix="scale-bench-"))
    runs_dir = base / "runs"
    corpus = Corpus(base, args.per_tar, args.seed, args.gen_workers)

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict = {"date": _dt.date.today().isoformat(), "per_tar": args.per_tar, "tiny": args.tiny,
                 "shard_samples": args.shard_samples,
                 "remove": args.remove, "seed": args.seed, "cpus": os.cpu_count(), "sizes": {}, "derived": {},
                 "corpus_dir": str(corpus.dir)}
    try:
        need = [t for n in sizes for t in corpus.layout(n)] + corpus.layout(args.tiny)
        need += [(max(i for i, _ in corpus.layout(n)) + 1, args.per_tar) for n in sizes]  # the tars step c adds
        res["generate_s"] = corpus.ensure(need)
        log(f"start-up build: {args.tiny} images, {args.tiny_repeat} time(s), each from scratch (the median counts)")
        res["tiny_builds"] = []
        for k in range(args.tiny_repeat):
            run = Run(runs_dir / f"n{args.tiny}-{k}", corpus, corpus.layout(args.tiny), exe, args.shard_samples)
            r = run.build("clean")
            res["tiny_builds"].append(r)
            log(f"  {args.tiny:>9,} clean  {r['wall_s']:8.1f}s  rss {r['peak_rss'] / MB:6.0f} MB ({r['rss_procs_max']} procs)"
                f"  verify {'ok' if r['verify']['ok'] else 'FAILED'}" + (f"  ERROR {r['error']}" if r.get("error") else ""))
            if not args.keep_runs:
                shutil.rmtree(run.root, ignore_errors=True)
        for n in sizes:
            log(f"size {n:,}: {len(corpus.layout(n))} tar(s)")
            run = Run(runs_dir / f"n{n}", corpus, corpus.layout(n), exe, args.shard_samples)
            size = res["sizes"][str(n)] = {"images": n, "builds": {}}
            try:
                measure_size(run, n, corpus, args.remove, log, size)
            except Exception as exc:  # noqa: BLE001 - a broken measurement fails its targets; the rest still runs
                import traceback

                traceback.print_exc()
                size["error"] = f"{type(exc).__name__}: {exc}"
            if args.out:  # what is measured so far survives a later crash
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
            if not args.keep_runs:
                shutil.rmtree(run.root, ignore_errors=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(res, args)


def finish(res: dict, args) -> int:
    targets = evaluate(res)
    res["targets"] = targets
    print()
    print(report(res, targets))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"\nraw numbers: {args.out}")
    failed = [t["target"] for t in targets if t["pass"] is False]
    if failed:
        print(f"\nFAIL: {len(failed)} target(s): {'; '.join(failed)}")
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
