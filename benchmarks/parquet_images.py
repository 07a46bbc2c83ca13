"""Benchmark (issue 14): building from images embedded in parquet (Hugging Face Hub style) vs
building the same images from LAION-style tars, and the memory of a parquet build against its
row-group size.

    python benchmarks/parquet_images.py --images 10000 [--files 4] [--repeat 2] [--out results.json]
    python benchmarks/parquet_images.py --images 10000 --corpus-root /work/scale   # reuse scale.py's tars

Target (issue 14): "building from parquet-embedded images costs at most 1.1x building the same
images from tars, with memory bounded by a row group, not a file."

Samples. scale.py's corpus (small real-photo crops, 160-260 px sides, JPEG q88-92, LAION-style
tars of 10,000; `--corpus-root DIR` reuses DIR/corpus-v1-p10000-s<seed>, else it is generated
under the run's directory): the first N samples are read once and written, same bytes, same ids,
same captions, as
  - tar: --files LAION-style tars (<key>.jpg, <key>.txt, <key>.json), contiguous ranges of the ids;
  - hf: the same ranges as parquet written by `datasets` itself: Features {key, image: Image(),
    text, url, similarity, NSFW, width, height}, Dataset.from_dict, then
    ds.shard(num_shards=k, index=i, contiguous=True).to_parquet(train-0000i-of-0000k.parquet)
    with datasets' own row-group size (it aims at 100 MB uncompressed row groups; reported);
  - one-group: all N rows as ONE file with one row group (to_parquet(batch_size=N));
  - small-groups: all N rows as ONE file of --small-groups (100) row rows per group.

Builds (`bucket-assets build` as a subprocess, scale.Run.build: its own run directory, work dir,
export and DAGSTER_HOME each time, so every build is clean). The spec is the same apart from the
source (both named `src`, caption variant alt_text): base resolution 128, divisible 8, workers 0
(all cores), shards of 1,000, crop strategy center, and filters that both sources can express
alike: min_similarity and drop_nsfw off, a column rule similarity >= 0.3 (the tar's .json and
the parquet row both carry it, so both skip the same ~2 %). The tar source reads the .txt
caption, the parquet one columns {id: key, image: image, caption: text, url: url}. The shard
files themselves are not expected to be identical: the parquet source here maps no similarity /
nsfw columns, so those two fields of a sample's .json are null for it, and `source_meta` is the
tar's .json on one side and the parquet row on the other; the fields that differ are reported.
  1. tar / hf alternately, --repeat rounds (A/B/A/B: the shared machine's drift hits both):
     wall time, per-stage seconds from the event log (raw_index, processed_images,
     bucket_shards, export_manifest, dataset_card, checks, other, pre/post), CPU seconds, peak
     RSS of the build's process tree (scale.TreeRss) and per process (VmHWM of each process,
     sampled from /proc with the tree; "python3@12s 486" is a process started 12 s after the
     build process, which tells the scan's pool from the render pool); the ratio hf/tar of each round, its median -> PASS/FAIL
     against 1.10; the same ratio of CPU seconds and per stage (no target; on a shared machine
     the CPU ratio is the steadier one).
  2. every build: `bucket-assets verify`, the accounting identity (images_seen == exported +
     skips == N); per round the two exports hold the same image ids with byte-identical JPEGs
     and the same captions (read from the shards' .json/.jpg/.txt), and the same buckets.
  3. one-group and small-groups (--mem-repeat times each, alternating): peak RSS of the tree and
     per process, against the image column's bytes per row group; the expectation is that RSS
     follows the row group, not the file (both files are the same size). Reported as measured,
     no threshold: the table gives the difference of the two builds' peaks and the row group's
     uncompressed image bytes beside it.

Writes every number to --out (JSON; default <dir>/parquet_images.json) and prints the tables.
Exit 1 when the ratio target or a correctness check fails (unless --no-fail). The machine is
shared: a single ratio varies by about +-10 %, so compare ratios within one run and rerun a
verdict near the limit.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402 - the corpus, the build runner and the RSS sampler

MB = scale.MB
STAGES = scale.STAGES + ("checks", "other")
TARGET = 1.10


# Per-process peaks ----------------------------------------------------------------------------

class TreeHwm(scale.TreeRss):
    """scale.TreeRss plus each process's own peak (VmHWM, the kernel's high-water mark of its
    RSS) as last seen in a sample; scale.Run.build uses it through scale.TreeRss below."""

    last: "TreeHwm | None" = None

    def __init__(self, pid: int, interval: float = 0.2):
        self.hwm: dict[int, tuple[str, int]] = {}  # pid -> (name, peak bytes); before the thread starts
        TreeHwm.last = self
        super().__init__(pid, interval)

    def _sample(self) -> None:
        super()._sample()
        for p in self._tree():
            try:
                with open(f"/proc/{p}/status") as f:
                    hwm = next((int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")), None)
                with open(f"/proc/{p}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if hwm is not None and hwm >= self.hwm.get(p, ("", 0, 0.0))[1]:
                self.hwm[p] = ("build" if p == self.pid else name, hwm, self._started(p))

    def _started(self, p: int) -> float:
        """Seconds from the build process's start to this process's (which pool it is: the scan's
        workers start with raw_index, the render workers with processed_images)."""
        def ticks(q: int) -> int:
            with open(f"/proc/{q}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[19])
        try:
            return (ticks(p) - ticks(self.pid)) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def per_process(self) -> list[dict]:
        return [{"pid": p, "name": n, "peak_mb": round(b / MB, 1), "started_s": round(t, 1)}
                for p, (n, b, t) in sorted(self.hwm.items(), key=lambda x: -x[1][1])]


def _procs(b: dict, top: int = 4) -> str:
    return ", ".join(f"{p['name']}" + (f"@{p['started_s']:.0f}s" if p["name"] != "build" else "") + f" {p['peak_mb']:.0f}"
                     for p in b["per_process"][:top])


scale.TreeRss = TreeHwm


# Data -----------------------------------------------------------------------------------------

def read_samples(corpus: scale.Corpus, n: int) -> dict[str, list]:
    """The first n samples of the corpus, in order: key, jpg bytes, caption (.txt), .json."""
    if not all(corpus.path(i, c).is_file() for i, c in corpus.layout(n)):
        corpus.ensure(corpus.layout(n))  # (only then: ensure also sweeps the dir's *.tmp-* leftovers)
    out: dict[str, list] = {"key": [], "jpg": [], "txt": [], "json": []}
    for idx, count in corpus.layout(n):
        with tarfile.open(corpus.path(idx, count)) as tf:
            cur: dict[str, bytes] = {}
            for ti in tf:
                key, ext = ti.name.rsplit(".", 1)
                cur[ext] = tf.extractfile(ti).read()
                if len(cur) == 3:
                    out["key"].append(key)
                    out["jpg"].append(cur["jpg"])
                    out["txt"].append(cur["txt"])
                    out["json"].append(cur["json"])
                    cur = {}
    assert len(out["key"]) == n and len(set(out["key"])) == n, "corpus tars are not <key>.{jpg,txt,json} triples"
    return out


def hf_dataset(s: dict[str, list]):
    import datasets

    metas = [json.loads(j) for j in s["json"]]
    feats = datasets.Features({
        "key": datasets.Value("string"), "image": datasets.Image(), "text": datasets.Value("string"),
        "url": datasets.Value("string"), "similarity": datasets.Value("float64"), "NSFW": datasets.Value("string"),
        "width": datasets.Value("int32"), "height": datasets.Value("int32")})
    return datasets.Dataset.from_dict({
        "key": s["key"],
        "image": [{"bytes": b, "path": f"{k}.jpg"} for k, b in zip(s["key"], s["jpg"])],
        "text": [t.decode() for t in s["txt"]],
        "url": [m["url"] for m in metas], "similarity": [m["similarity"] for m in metas],
        "NSFW": [m["NSFW"] for m in metas], "width": [m["width"] for m in metas],
        "height": [m["height"] for m in metas]}, features=feats)


def parquet_layout(paths: list[Path], image_col: str = "image") -> dict:
    """Files, rows, row groups and the image column's bytes per row group (max over groups)."""
    import pyarrow.parquet as pq

    groups, comp, uncomp, rows = [], [], [], 0
    for p in paths:
        md = pq.read_metadata(p)
        rows += md.num_rows
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            groups.append(rg.num_rows)
            cols = [rg.column(c) for c in range(rg.num_columns)
                    if rg.column(c).path_in_schema.split(".")[0] == image_col]
            comp.append(sum(c.total_compressed_size for c in cols))
            uncomp.append(sum(c.total_uncompressed_size for c in cols))
    return {"files": len(paths), "rows": rows, "row_groups": len(groups),
            "rows_per_group_min": min(groups), "rows_per_group_max": max(groups),
            "image_bytes_per_group_max_mb": round(max(uncomp) / MB, 2),
            "image_bytes_per_group_compressed_max_mb": round(max(comp) / MB, 2),
            "file_bytes_mb": round(sum(p.stat().st_size for p in paths) / MB, 2)}


def write_variants(s: dict[str, list], d: Path, files: int, small: int) -> dict[str, dict]:
    """The tar, hf, one-group and small-groups copies of the samples under d (reused when complete)."""
    n = len(s["key"])
    done = d / "complete.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    ds = hf_dataset(s)
    out: dict[str, dict] = {}
    (d / "hf").mkdir(parents=True)
    (d / "tar").mkdir()
    hf_paths, tar_paths, first = [], [], 0
    for i in range(files):
        part = ds.shard(num_shards=files, index=i, contiguous=True)
        p = d / "hf" / f"train-{i:05d}-of-{files:05d}.parquet"
        part.to_parquet(str(p))  # datasets' own row-group size
        hf_paths.append(p)
        keys = part["key"]
        assert keys == s["key"][first:first + len(keys)], "datasets' contiguous shard is not a contiguous range"
        tp = d / "tar" / f"{i:05d}.tar"
        with open(tp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(first, first + len(keys)):
                k = s["key"][j]
                scale._member(tf, f"{k}.jpg", s["jpg"][j])
                scale._member(tf, f"{k}.txt", s["txt"][j])
                scale._member(tf, f"{k}.json", s["json"][j])
        tar_paths.append(tp)
        first += len(keys)
    assert first == n
    for name, batch in (("one-group", n), ("small-groups", small)):
        (d / name).mkdir()
        p = d / name / "train-00000-of-00001.parquet"
        ds.to_parquet(str(p), batch_size=batch)
        out[name] = {"paths": [str(p)], **parquet_layout([p])}
    out["hf"] = {"paths": [str(p) for p in hf_paths], **parquet_layout(hf_paths)}
    out["tar"] = {"paths": [str(p) for p in tar_paths], "files": len(tar_paths),
                  "file_bytes_mb": round(sum(p.stat().st_size for p in tar_paths) / MB, 2)}
    # The bytes went in unchanged: a row read back through pyarrow is the tar's member.
    import pyarrow.parquet as pq

    for name in ("hf", "one-group", "small-groups"):
        tab = pq.ParquetFile(out[name]["paths"][-1]).read_row_group(0, columns=["key", "image"])
        k, img = tab.column("key")[0].as_py(), tab.column("image")[0].as_py()
        assert img["bytes"] == s["jpg"][s["key"].index(k)], f"{name}: row {k}'s image bytes differ from the tar's"
    out["_write_s"] = {"s": time.perf_counter() - t}
    done.write_text(json.dumps(out, indent=1))
    return out


# Builds ---------------------------------------------------------------------------------------

SOURCES = {
    "tar": {"name": "src", "kind": "webdataset", "paths": ["src/*.tar"], "caption_variant": "alt_text"},
    "parquet": {"name": "src", "kind": "parquet", "path": "src/*.parquet", "caption_variant": "alt_text",
                "columns": {"id": "key", "image": "image", "caption": "text", "url": "url"}},
}


class BuildDir(scale.Run):
    """A run directory for one clean build of one variant; scale.Run.build measures it."""

    def __init__(self, root: Path, files: list[str], kind: str, samples: int, exe: str, shard_samples: int):
        import yaml

        self.root, self.exe, self.n_builds = root, exe, 0
        shutil.rmtree(root, ignore_errors=True)
        self.src = root / "src"
        self.export, self.work, self.home = root / "export", root / "work", root / "dagster_home"
        self.src.mkdir(parents=True)
        (root / "captions").mkdir()
        for f in files:
            try:
                os.link(f, self.src / Path(f).name)
            except OSError:
                shutil.copyfile(f, self.src / Path(f).name)
        self.tars = {0: samples}  # scale.Run.samples: what the accounting identity expects
        spec = {
            "name": "pqbench", "output_dir": "export", "work_dir": "work",
            "sources": [SOURCES[kind]],
            "buckets": {"base_resolutions": [128], "divisible": 8},
            "image": {"workers": 0, "crop": {"strategy": "center"}},
            "captions": {"landing_dir": "captions", "selectors": ["alt_text"]},
            "filters": {"min_similarity": None, "drop_nsfw": [], "columns": [{"column": "similarity", "min": 0.3}]},
            "shards": {"max_samples": shard_samples},
        }
        self.spec = root / "spec.yaml"
        self.spec.write_text(yaml.safe_dump(spec, sort_keys=False))


def export_samples(export: Path) -> dict[str, tuple[str, str, str, dict]]:
    """image_id -> (sha256 of the .jpg, the .txt caption, bucket, the .json) of every shard in the manifest."""
    m = scale.read_manifest(export) or {}
    got: dict[str, tuple[str, str, str, dict]] = {}
    for b, info in m.get("buckets", {}).items():
        for sh in info.get("shards", []):
            with tarfile.open(export / sh["path"]) as tf:
                cur: dict[str, dict[str, bytes]] = {}
                for ti in tf:
                    if not ti.isfile():
                        continue
                    key, ext = ti.name.rsplit(".", 1)
                    cur.setdefault(key, {})[ext] = tf.extractfile(ti).read()
            for files in cur.values():
                meta = json.loads(files["json"])
                got[meta["image_id"]] = (hashlib.sha256(files["jpg"]).hexdigest(), files["txt"].decode(), b, meta)
    return got


def compare_exports(a: Path, b: Path) -> dict:
    sa, sb = export_samples(a), export_samples(b)
    common = sa.keys() & sb.keys()
    jpg = [k for k in sorted(common) if sa[k][0] != sb[k][0]]
    cap = [k for k in sorted(common) if sa[k][1] != sb[k][1]]
    bucket = [k for k in sorted(common) if sa[k][2] != sb[k][2]]
    fields: dict[str, int] = {}  # .json keys whose value differs, and in how many samples
    for k in common:
        ja, jb = sa[k][3], sb[k][3]
        for f in ja.keys() | jb.keys():
            if ja.get(f) != jb.get(f):
                fields[f] = fields.get(f, 0) + 1
    ma, mb = scale.manifest_shas(scale.read_manifest(a)), scale.manifest_shas(scale.read_manifest(b))
    out = {"tar_samples": len(sa), "parquet_samples": len(sb), "only_tar": len(sa.keys() - sb.keys()),
           "only_parquet": len(sb.keys() - sa.keys()), "jpg_differ": len(jpg), "caption_differ": len(cap),
           "bucket_differ": len(bucket), "examples": (jpg + cap + bucket)[:5],
           "json_fields_differ": dict(sorted(fields.items())), "shard_files": len(mb), "shard_files_identical": sum(1 for p, h in mb.items() if ma.get(p) == h)}
    out["ok"] = bool(sa) and sa.keys() == sb.keys() and not jpg and not cap and not bucket
    return out


def measure(label: str, bd: BuildDir, layout: dict, log) -> dict:
    r = bd.build(label)
    hwm = TreeHwm.last
    r["per_process"] = hwm.per_process() if hwm else []
    r["layout"] = {k: v for k, v in layout.items() if k != "paths"}
    st = r["stages"]
    procs = _procs(r)
    log(f"  {label:<13} {r['wall_s']:7.1f}s  cpu {r['cpu_s']:6.1f}s  rss {r['peak_rss'] / MB:5.0f} MB"
        f" ({r['rss_procs_max']} procs; peaks {procs})  verify {'ok' if r['verify']['ok'] else 'FAILED'}"
        f"  identity {'ok' if r['accounting']['ok'] else 'FAILED'}  [raw {st['raw_index']:.1f}"
        f" img {st['processed_images']:.1f} shards {st['bucket_shards']:.1f} manifest {st['export_manifest']:.1f}"
        f" card {st['dataset_card']:.1f} checks {st['checks']:.1f} other {st['other']:.1f} pre {r['pre_s'] or 0:.1f}]"
        + (f"  ERROR {r['error']}" if r.get("error") else ""))
    return r


# Report ---------------------------------------------------------------------------------------

def evaluate(res: dict) -> list[dict]:
    targets = []
    rounds = res["rounds"]
    ratios = [r["ratio_wall"] for r in rounds if r.get("ratio_wall") is not None]
    med = statistics.median(ratios) if ratios and len(ratios) == len(rounds) else None
    res["ratio_wall_median"] = med
    cpu = [r["ratio_cpu"] for r in rounds if r.get("ratio_cpu") is not None]
    res["ratio_cpu_median"] = statistics.median(cpu) if cpu else None
    res["ratio_stage_median"] = {
        s: statistics.median(v) for s in STAGES
        if (v := [r["ratio_stages"][s] for r in rounds if r.get("ratio_stages", {}).get(s) is not None])}
    targets.append({"target": f"parquet (hf) build <= {TARGET:.2f}x the tar build (median of {len(rounds)} rounds)",
                    "pass": med is not None and med <= TARGET,
                    "shown": "n/a" if med is None else f"{med:.3f}x (rounds: {', '.join(f'{x:.3f}' for x in ratios)})"})
    builds = [b for r in rounds for b in (r.get("tar"), r.get("hf"))] + res["memory_builds"]
    done = [b for b in builds if b]
    targets.append({"target": "every export verifies", "pass": len(done) == len(builds) and all(b["verify"]["ok"] for b in done),
                    "shown": f"{sum(b['verify']['ok'] for b in done)}/{len(builds)} builds"})
    targets.append({"target": "images_seen == exported + skips == N, every build",
                    "pass": len(done) == len(builds) and all(b["accounting"]["ok"] for b in done),
                    "shown": f"{sum(b['accounting']['ok'] for b in done)}/{len(builds)} builds"})
    cmp = [r.get("compare") for r in rounds]
    targets.append({"target": "tar and parquet exports: same ids, byte-identical JPEGs, same captions and buckets",
                    "pass": all(c and c["ok"] for c in cmp),
                    "shown": "; ".join("n/a" if not c else
                                       f"{c['parquet_samples']:,} vs {c['tar_samples']:,} samples, {c['jpg_differ']} jpg /"
                                       f" {c['caption_differ']} caption / {c['bucket_differ']} bucket differ,"
                                       f" {c['shard_files_identical']}/{c['shard_files']} shard files identical"
                                       f" (.json differs in {c['json_fields_differ'] or 'nothing'})"
                                       for c in cmp)})
    return targets


def report(res: dict) -> str:
    head = ["build", "files", "row groups (rows each)", "image MB per group", "wall s", "cpu s", *STAGES, "pre+post",
            "peak RSS MB (procs)", "per-process peaks MB", "verify", "identity"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = [b for r in res["rounds"] for b in (r.get("tar"), r.get("hf")) if b] + res["memory_builds"]
    for b in rows:
        lay, st = b["layout"], b["stages"]
        pp = (b["pre_s"] or 0) + (b["post_s"] or 0) if b["pre_s"] is not None else None
        groups = (f"{lay['row_groups']} ({lay['rows_per_group_min']:,}"
                  + (f"-{lay['rows_per_group_max']:,}" if lay['rows_per_group_max'] != lay['rows_per_group_min'] else "")
                  + ")") if "row_groups" in lay else ""
        cells = [b["label"], str(lay["files"]), groups, str(lay.get("image_bytes_per_group_max_mb", "")),
                 f"{b['wall_s']:.1f}", scale._f(b.get("cpu_s")), *(f"{st[s]:.1f}" for s in STAGES), scale._f(pp),
                 f"{b['peak_rss'] / MB:.0f} ({b['rss_procs_max']})",
                 _procs(b),
                 "ok" if b["verify"]["ok"] else "FAIL", "ok" if b["accounting"]["ok"] else "FAIL"]
        if b["rc"] != 0:
            cells[4] += f" (failed: {b.get('error', '')[:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio parquet/tar | " + " | ".join(["wall", "cpu", *STAGES]) + " |", "|" + " --- |" * (len(STAGES) + 3)]
    for i, r in enumerate(res["rounds"]):
        lines.append(f"| round {i + 1} | " + " | ".join(
            [scale._f(r.get("ratio_wall"), "{:.3f}"), scale._f(r.get("ratio_cpu"), "{:.3f}")]
            + [scale._f(r.get("ratio_stages", {}).get(s), "{:.2f}") for s in STAGES]) + " |")
    lines.append("| median | " + " | ".join(
        [scale._f(res.get("ratio_wall_median"), "{:.3f}"), scale._f(res.get("ratio_cpu_median"), "{:.3f}")]
        + [scale._f(res["ratio_stage_median"].get(s), "{:.2f}") for s in STAGES]) + " |")
    mem = res.get("memory")
    if mem:
        lines += ["", "| memory | measured |", "| --- | --- |"]
        for k, v in mem.items():
            lines.append(f"| {k} | {v} |")
    lines += ["", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['shown']} | {'PASS' if t['pass'] else 'FAIL'} |" for t in res["targets"]]
    return "\n".join(lines)


def memory_summary(res: dict) -> dict:
    mb = res["memory_builds"]
    by = {lb: [b for b in mb if b["label"].startswith(lb) and b["rc"] == 0] for lb in ("one-group", "small-groups")}
    out = {}
    lay = res["layouts"]
    for lb, bs in by.items():
        if bs:
            peak = max(b["peak_rss"] for b in bs) / MB
            workers = [p["peak_mb"] for b in bs for p in b["per_process"] if p["name"] != "build"]
            coord = [p["peak_mb"] for b in bs for p in b["per_process"] if p["name"] == "build"]
            out[lb] = (f"tree peak {peak:.0f} MB; largest process {max(workers + coord, default=0):.0f} MB,"
                       f" the build process {max(coord, default=0):.0f} MB; 1 file of {lay[lb]['file_bytes_mb']:.0f} MB,"
                       f" {lay[lb]['row_groups']} row group(s) of {lay[lb]['rows_per_group_max']:,} rows,"
                       f" image column {lay[lb]['image_bytes_per_group_max_mb']:.1f} MB per group")
    if by["one-group"] and by["small-groups"]:
        d = (max(b["peak_rss"] for b in by["one-group"]) - max(b["peak_rss"] for b in by["small-groups"])) / MB
        g = lay["one-group"]["image_bytes_per_group_max_mb"] - lay["small-groups"]["image_bytes_per_group_max_mb"]
        out["one-group minus small-groups"] = f"{d:+.0f} MB of tree peak for {g:+.1f} MB more image bytes per row group"
        res["memory_delta_mb"], res["memory_group_delta_mb"] = d, g
    tb = [b for r in res["rounds"] for b in [r.get("tar")] if b and b["rc"] == 0]
    hb = [b for r in res["rounds"] for b in [r.get("hf")] if b and b["rc"] == 0]
    if tb and hb:
        out["tar vs hf (max over rounds)"] = (f"{max(b['peak_rss'] for b in tb) / MB:.0f} MB vs "
                                              f"{max(b['peak_rss'] for b in hb) / MB:.0f} MB (hf: {lay['hf']['files']} files,"
                                              f" {lay['hf']['row_groups']} row groups of up to"
                                              f" {lay['hf']['rows_per_group_max']:,} rows,"
                                              f" {lay['hf']['image_bytes_per_group_max_mb']:.1f} MB of images each)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=4, help="tar files and parquet files (contiguous ranges)")
    ap.add_argument("--repeat", type=int, default=2, help="tar/parquet rounds (A/B/A/B)")
    ap.add_argument("--mem-repeat", type=int, default=1, help="builds of each single-file row-group variant")
    ap.add_argument("--small-groups", type=int, default=100, help="rows per row group of the small-groups file")
    ap.add_argument("--shard-samples", type=int, default=1000)
    ap.add_argument("--corpus-root", help="where scale.py's corpus lives or is generated (e.g. /work/scale)")
    ap.add_argument("--keep", metavar="DIR", help="work under DIR (the written variants are reused next time)")
    ap.add_argument("--keep-runs", action="store_true", help="keep every build's run directory")
    ap.add_argument("--out", help="JSON result file (default: <dir>/parquet_images.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fail", action="store_true")
    args = ap.parse_args()
    if args.images < args.files or args.files < 1 or args.repeat < 1 or args.small_groups < 1:
        ap.error("need --images >= --files >= 1, --repeat >= 1, --small-groups >= 1")
    exe = os.path.join(os.path.dirname(sys.executable), "bucket-assets")
    if not os.path.exists(exe):
        ap.error(f"{exe} not found: run this with the project's venv python")
    tmp = None
    base = Path(args.keep).resolve() if args.keep else Path(tmp := tempfile.mkdtemp(prefix="pq-bench-"))
    out_json = Path(args.out) if args.out else base / "parquet_images.json"

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict = {"date": _dt.date.today().isoformat(), "images": args.images, "files": args.files,
                 "repeat": args.repeat, "small_groups": args.small_groups, "cpus": os.cpu_count(),
                 "rounds": [], "memory_builds": []}
    try:
        import datasets

        res["datasets_version"] = datasets.__version__
        corpus = scale.Corpus(Path(args.corpus_root).resolve() if args.corpus_root else base, 10_000, args.seed,
                              os.cpu_count() or 1)
        res["corpus_dir"] = str(corpus.dir)
        t = time.perf_counter()
        samples = read_samples(corpus, args.images)
        data = base / f"data-n{args.images}-f{args.files}-g{args.small_groups}-s{args.seed}"
        lay = write_variants(samples, data, args.files, args.small_groups)
        del samples
        res["prepare_s"] = time.perf_counter() - t
        res["layouts"] = {k: {kk: vv for kk, vv in v.items() if kk != "paths"} for k, v in lay.items() if k != "_write_s"}
        for k, v in res["layouts"].items():
            log(f"{k}: {v}")

        def one(label: str, variant: str, kind: str) -> dict:
            bd = BuildDir(base / "runs" / label, lay[variant]["paths"], kind, args.images, exe, args.shard_samples)
            return measure(label, bd, lay[variant], log)

        for i in range(args.repeat):
            log(f"round {i + 1}/{args.repeat}: tar, then parquet")
            rnd: dict = {}
            res["rounds"].append(rnd)
            rnd["tar"] = one(f"tar-{i + 1}", "tar", "tar")
            rnd["hf"] = one(f"hf-{i + 1}", "hf", "parquet")
            a, b = rnd["tar"], rnd["hf"]
            if a["rc"] == 0 and b["rc"] == 0:
                rnd["ratio_wall"] = b["wall_s"] / a["wall_s"]
                rnd["ratio_cpu"] = b["cpu_s"] / a["cpu_s"] if a["cpu_s"] else None
                rnd["ratio_stages"] = {s: (b["stages"][s] / a["stages"][s] if a["stages"][s] > 0 else None) for s in STAGES}
                rnd["compare"] = compare_exports(base / "runs" / f"tar-{i + 1}" / "export",
                                                 base / "runs" / f"hf-{i + 1}" / "export")
                c = rnd["compare"]
                log(f"  ratio {rnd['ratio_wall']:.3f}; exports: {c['parquet_samples']:,} vs {c['tar_samples']:,} samples,"
                    f" {c['jpg_differ']} jpg / {c['caption_differ']} caption / {c['bucket_differ']} bucket differ,"
                    f" {c['shard_files_identical']}/{c['shard_files']} shard files identical"
                    f" (.json differs in {c['json_fields_differ'] or 'nothing'})")
            if not args.keep_runs:
                for lb in (f"tar-{i + 1}", f"hf-{i + 1}"):
                    shutil.rmtree(base / "runs" / lb, ignore_errors=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        log("memory: one file, one row group vs the same file in small row groups")
        for i in range(args.mem_repeat):
            for variant in ("one-group", "small-groups"):
                label = f"{variant}-{i + 1}"
                res["memory_builds"].append(one(label, variant, "parquet"))
                if not args.keep_runs:
                    shutil.rmtree(base / "runs" / label, ignore_errors=True)
    finally:
        res["memory"] = memory_summary(res) if res.get("layouts") else {}
        res["targets"] = evaluate(res)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        if tmp and not args.out:
            out_json = Path(shutil.copy(out_json, Path.cwd() / "parquet_images.json"))
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(report(res))
    print(f"\nraw numbers: {out_json}")
    failed = [t["target"] for t in res["targets"] if not t["pass"]]
    if failed:
        print(f"\nFAIL: {'; '.join(failed)}")
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
