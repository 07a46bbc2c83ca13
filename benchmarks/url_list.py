"""Benchmark (issue 13): url_downloads on URL lists of 10,000 / 1,000,000 / 3,000,000 rows, for the
coordinator's peak memory and time: a first run, a no-op rerun, and a rerun after 1 % of the rows
got a new URL.

    python benchmarks/url_list.py [--rows 10000,1000000,3000000] [--python PY] [--keep DIR] [--out FILE]

Data, per size: metadata parquet files of 100,000 rows each (columns key, url, caption). Every
100th URL points at a loopback HTTP server started here that serves one of 64 small JPEGs; the
rest are `ftp://` URLs, which the downloader records as invalid_url without a request. So the run
costs what the product itself does per URL (listing, deciding what to fetch, journaling, stat'ing
stored bytes, committing), not what the network does. The change step gives every 100th row a new
URL on the server (the rows between two of them unchanged).

Each run materializes the url_downloads asset alone (`dagster.materialize`, in-process executor)
in a fresh subprocess of --python (default: this interpreter; point it at another checkout's venv
to compare code), which reports its own wall time and peak RSS (getrusage). The spec, work dir
and server are the same for the three runs of a size.

Target (the issue's memory rule, applied to this asset): the coordinator's memory does not follow
the URL count. What may grow is DuckDB's buffer pool, up to its caps (the deciding joins and the
commit run under metadata.stream_memory_limit, 256MB): between 10,000 and 1,000,000 URLs it fills;
past that it is full. So the target is on the two largest sizes (by default 1,000,000 and
3,000,000 URLs): peak RSS at the largest at most 1.10x that at the one before. Every size's peak
and its ratio to the smallest are printed. Exit 1 when the target fails, unless --no-fail.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

PER_FILE = 100_000
EVERY = 100  # every EVERY-th row is a real URL (and changes in the change step)

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import dagster as dg
from bucket_assets.defs.assets.downloads import url_downloads
from bucket_assets.defs.resources import ComputeResource, DatasetResource
t1 = time.perf_counter()
res = dg.materialize([url_downloads], resources={"dataset": DatasetResource(spec_path=sys.argv[1]),
                                                  "compute": ComputeResource()},
                     instance=dg.DagsterInstance.ephemeral(), raise_on_error=True)
t2 = time.perf_counter()
md = res.asset_materializations_for_node("url_downloads")[0].metadata
print(json.dumps({"import_s": t1 - t0, "asset_s": t2 - t1,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rows": md["dagster/row_count"].value, "fetched": md["fetched"].value,
                  "reused": md["reused"].value}))
"""


def _jpegs() -> list[bytes]:
    out = []
    for k in range(64):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


class Server:
    def __init__(self):
        images = _jpegs()

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                n = int(self.path.rsplit("/", 1)[1].split("-")[0])
                body = images[n % len(images)]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_list(meta: Path, n: int, base: str, version: int) -> None:
    """The metadata files of an n-row list; `version` 1 gives every EVERY-th row a new URL."""
    meta.mkdir(parents=True, exist_ok=True)
    for old in meta.glob("*.parquet"):
        old.unlink()
    for f, start in enumerate(range(0, n, PER_FILE)):
        idx = np.arange(start, min(n, start + PER_FILE))
        urls = [f"{base}/img/{i}-{version}.jpg" if i % EVERY == 0 else f"ftp://files.invalid/{i}.jpg" for i in idx]
        t = pa.table({"key": pa.array([f"{i:010d}" for i in idx]), "url": pa.array(urls),
                      "caption": pa.array([f"a photo number {i}" for i in idx])})
        pq.write_table(t, meta / f"part-{f:05d}.parquet", row_group_size=16_384)


def run_child(python: str, spec: Path) -> dict:
    t = time.perf_counter()
    p = subprocess.run([python, "-c", CHILD, str(spec)], capture_output=True, text=True, cwd=spec.parent)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"url_downloads failed ({spec}):\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_s"] = wall
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="10000,1000000,3000000")
    ap.add_argument("--python", default=sys.executable, help="interpreter (venv) whose bucket_assets is measured")
    ap.add_argument("--keep", help="work under DIR (kept) instead of a temporary directory")
    ap.add_argument("--out", help="write the numbers as JSON here")
    ap.add_argument("--no-fail", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.rows.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="url-list-"))
    server = Server()
    results: dict[str, dict] = {}
    try:
        for n in sizes:
            d = root / f"n{n}"
            meta = d / "meta"
            write_list(meta, n, server.base, 0)
            spec = {
                "name": "url-list", "output_dir": str(d / "export"), "work_dir": str(d / "work"),
                "sources": [{"name": "web", "kind": "urls", "path": str(meta / "*.parquet"),
                             "columns": {"id": "key", "url": "url", "caption": "caption"},
                             "download": {"concurrency": 16, "per_host": 16, "retries": 0, "timeout_s": 10}}],
                "buckets": {"base_resolutions": [128], "divisible": 8},
                "captions": {"landing_dir": str(d / "captions"), "selectors": ["alt_text"]},
            }
            (d / "captions").mkdir(parents=True, exist_ok=True)
            (d / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            res = results[str(n)] = {}
            for step in ("first", "noop", "change"):
                if step == "change":
                    write_list(meta, n, server.base, 1)
                r = res[step] = run_child(args.python, d / "spec.yaml")
                print(f"{n:>10,} {step:<6} asset {r['asset_s']:7.1f} s  peak RSS {r['peak_rss_kb'] / 1024:7.0f} MB  "
                      f"rows {r['rows']:,} fetched {r['fetched']:,} reused {r['reused']:,}", flush=True)
            want = {"first": (n, n), "noop": (n, 0), "change": (n, -(-n // EVERY))}
            for step, (rows, fetched) in want.items():
                if (res[step]["rows"], res[step]["fetched"]) != (rows, fetched):
                    raise SystemExit(f"{n}: {step}: rows/fetched {res[step]['rows']}/{res[step]['fetched']}, "
                                     f"expected {rows}/{fetched}")
    finally:
        server.close()
    peak = {n: max(r["peak_rss_kb"] for r in results[str(n)].values()) for n in sizes}
    for n in sizes:
        print(f"peak RSS {n:>10,} rows: {peak[n] / 1024:6.0f} MB ({peak[n] / peak[sizes[0]]:.2f}x the smallest)")
    ok, verdict = True, None
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        ratio = peak[b] / peak[a]
        ok = ratio <= 1.10
        verdict = {"from": a, "to": b, "ratio": ratio, "pass": ok}
        print(f"peak RSS growth {a:,} -> {b:,} rows ({b / a:.0f}x the URLs): {ratio:.3f}x: "
              f"{'PASS' if ok else 'FAIL'} (target <= 1.10x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"sizes": results, "peak_kb": {str(n): v for n, v in peak.items()},
                                              "target": verdict}, indent=2) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
