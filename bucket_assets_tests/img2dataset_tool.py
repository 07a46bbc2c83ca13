"""Real img2dataset output for tests: img2dataset from PyPI (in its own venv, installed once per
checkout under .cache/) run against a loopback HTTP server that serves real photographs, and
fails some URLs the ways the web does (404, 500, bytes that are not an image)."""

from __future__ import annotations

import http.server
import io
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".cache" / "img2dataset-venv"


def img2dataset_exe() -> tuple[Path | None, str]:
    """The img2dataset command, installing it on first use; (None, why) where it cannot install."""
    exe = VENV / "bin" / "img2dataset"
    if exe.exists():
        return exe, ""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "img2dataset"],
                           capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not exe.exists():
        lines = (r.stderr or r.stdout).strip().splitlines()
        return None, f"img2dataset does not install here: {lines[-1] if lines else r.returncode}"
    return exe, ""


def photo_bytes(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs cut from the photographs scikit-image ships (different sizes and aspects)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = photos[i % len(photos)]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        buf = io.BytesIO()
        Image.fromarray(arr[y:y + ch, x:x + cw]).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@contextmanager
def photo_server(photos: list[bytes]) -> Iterator[str]:
    """http://127.0.0.1:port serving /img<i>.jpg; /missing<i>.jpg is 404, /error<i>.jpg 500,
    /garbage<i>.jpg 200 with bytes that are not an image."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            name = self.path.rsplit("/", 1)[-1]
            if name.startswith("img") and name.endswith(".jpg") and name[3:-4].isdigit() and int(name[3:-4]) < len(photos):
                body, code, ctype = photos[int(name[3:-4])], 200, "image/jpeg"
            elif name.startswith("error"):
                body, code, ctype = b"", 500, "text/plain"
            elif name.startswith("garbage"):
                body, code, ctype = b"this is not an image" * 10, 200, "image/jpeg"
            else:
                body, code, ctype = b"", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a):
            pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_img2dataset(exe: Path, url_list: Path, out: Path, extra_columns: list[str], per_shard: int = 8) -> None:
    """img2dataset's webdataset output (tars + per-shard parquet + _stats.json) of `url_list`
    (a parquet with url, caption and the extra columns); images kept at their own size."""
    cmd = [
        str(exe), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", "1", "--thread_count", "4", "--resize_mode", "no",
        "--save_additional_columns", "[" + ",".join(repr(c) for c in extra_columns) + "]",
        "--enable_wandb", "False", "--number_sample_per_shard", str(per_shard), "--retries", "0", "--timeout", "5",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    # img2dataset sometimes hangs at exit after writing every shard (its worker pool, on a loaded
    # machine: seen once in CI, 600 s after "3it"); a run takes seconds, so a hung one is killed
    # with its process group and the run repeated from an empty output dir, at most 3 times.
    for attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            _stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            continue
        if proc.returncode != 0:
            raise AssertionError(f"img2dataset failed ({proc.returncode}): {stderr[-2000:]}")
        return
    raise AssertionError("img2dataset did not finish within 180 s, 3 times")
