"""The downloader against a real HTTP server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from bucket_assets.core.download import (
    DownloadSettings,
    blob_path,
    download_all,
    is_retryable,
    read_journal,
)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class FaultServer:
    """Paths: /img/<n> (a JPEG), /same/<n> (one shared JPEG), /404, /flaky/<n> (500, then ok),
    /ratelimit/<n> (429 + Retry-After: 1, then ok), /slow (headers after 3 s), /dribble (body
    trickles past the deadline), /truncated (Content-Length larger than the body), /html,
    /junk (octet-stream that is no image), /big (Content-Length too large), /bigchunked (no
    length, too much body), /redirect/<k> (k hops, then an image), /loop, /count/<n> (ok, counts
    requests in flight)."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.agents: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", ctype="image/jpeg", headers=None, length=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except OSError:
                    pass

            def do_GET(self):  # noqa: C901 - one branch per fault
                path = self.path
                with outer.lock:
                    n = outer.hits[path] = outer.hits.get(path, 0) + 1
                    outer.agents.add(self.headers.get("User-Agent", ""))
                parts = path.strip("/").split("/")
                kind = parts[0]
                if kind == "img":
                    self._send(200, _jpeg(int(parts[1])))
                elif kind == "same":
                    self._send(200, _jpeg(7))
                elif kind == "404":
                    self._send(404, b"not here", "text/plain")
                elif kind == "flaky":
                    self._send(500, b"oops", "text/plain") if n == 1 else self._send(200, _jpeg(int(parts[1])))
                elif kind == "ratelimit":
                    if n == 1:
                        self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
                    else:
                        self._send(200, _jpeg(int(parts[1])))
                elif kind == "slow":
                    time.sleep(3)
                    self._send(200, _jpeg(1))
                elif kind == "dribble":
                    body = _jpeg(2)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        for i in range(0, len(body), 64):
                            self.wfile.write(body[i:i + 64])
                            self.wfile.flush()
                            time.sleep(0.3)
                    except OSError:
                        pass
                elif kind == "truncated":
                    body = _jpeg(3)
                    self._send(200, body[:100], length=len(body))
                    self.close_connection = True
                elif kind == "html":
                    self._send(200, b"<html>hi</html>", "text/html; charset=utf-8")
                elif kind == "junk":
                    self._send(200, b"\x00\x01 not an image at all", "application/octet-stream")
                elif kind == "big":
                    self._send(200, b"", length=10**9)
                    self.close_connection = True
                elif kind == "bigchunked":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for _ in range(40):
                            chunk = b"\xff\xd8\xff" + b"x" * 8189
                            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                elif kind == "redirect":
                    k = int(parts[1])
                    target = f"/redirect/{k - 1}" if k > 1 else "/img/99"
                    self._send(302, b"", "text/plain", {"Location": target})
                elif kind == "loop":
                    self._send(302, b"", "text/plain", {"Location": "/loop"})
                elif kind == "count":
                    with outer.lock:
                        outer.in_flight += 1
                        outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    time.sleep(0.15)
                    with outer.lock:
                        outer.in_flight -= 1
                    self._send(200, _jpeg(int(parts[1])))
                else:
                    self._send(404, b"", "text/plain")

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 drops SYNs when 8 clients connect at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


SETTINGS = DownloadSettings(concurrency=8, per_host=8, timeout_s=1.0, retries=2, backoff_s=0.01, max_backoff_s=2.0,
                            max_bytes=200_000, max_redirects=4, user_agent="bucket-assets-test/1")


def _run(server, paths, tmp_path, settings=SETTINGS, previous=None, sleeps=None):
    items = [(f"id{i}", server.base + p) for i, p in enumerate(paths)]
    sleep = (lambda s: sleeps.append(s)) if sleeps is not None else (lambda s: None)
    return download_all(items, tmp_path / "store", settings, previous, tmp_path / "journal.jsonl", sleep=sleep)


def test_every_fault_ends_as_bytes_or_the_right_reason(server, tmp_path):
    paths = ["/img/1", "/404", "/flaky/2", "/ratelimit/3", "/slow", "/dribble", "/truncated", "/html", "/junk",
             "/big", "/bigchunked", "/redirect/3", "/loop"]
    sleeps: list[float] = []
    t = time.monotonic()
    rows = _run(server, paths, tmp_path, sleeps=sleeps)
    took = time.monotonic() - t
    got = {p: r for p, r in zip(paths, rows)}
    assert {p: r["status"] for p, r in got.items()} == {
        "/img/1": "ok", "/404": "http_404", "/flaky/2": "ok", "/ratelimit/3": "ok", "/slow": "timeout",
        "/dribble": "timeout", "/truncated": "truncated", "/html": "not_an_image", "/junk": "not_an_image",
        "/big": "too_large", "/bigchunked": "too_large", "/redirect/3": "ok", "/loop": "redirect_loop",
    }
    assert [r["image_id"] for r in rows] == [f"id{i}" for i in range(len(paths))]  # input order
    # Retried faults: attempts counted; final ones tried once.
    assert got["/flaky/2"]["attempts"] == 2 and got["/ratelimit/3"]["attempts"] == 2, (got["/flaky/2"], got["/ratelimit/3"], server.hits)
    assert got["/slow"]["attempts"] == got["/truncated"]["attempts"] == 3
    assert got["/404"]["attempts"] == got["/html"]["attempts"] == got["/loop"]["attempts"] == 1
    assert 1.0 in sleeps  # Retry-After honoured
    assert got["/404"]["http_status"] == 404
    assert got["/redirect/3"]["final_url"] == server.base + "/img/99"
    # Stored bytes are the served bytes, under their sha256.
    for p, seed in (("/img/1", 1), ("/flaky/2", 2), ("/ratelimit/3", 3), ("/redirect/3", 99)):
        r = got[p]
        assert blob_path(tmp_path / "store", r["sha256"]).read_bytes() == _jpeg(seed)
        assert r["bytes"] == len(_jpeg(seed)) and r["content_type"] == "image/jpeg"
    assert server.agents == {"bucket-assets-test/1"}
    assert server.hits["/loop"] == SETTINGS.max_redirects + 1
    assert took < 30
    # Every fetched result was journaled.
    assert len(read_journal(tmp_path / "journal.jsonl")) == len(paths)


def test_a_rerun_fetches_only_what_is_missing_or_retryable(server, tmp_path):
    paths = ["/img/1", "/404", "/slow", "/html", "/img/2"]
    first = _run(server, paths, tmp_path, DownloadSettings(**{**SETTINGS.__dict__, "retries": 0}))
    assert [r["status"] for r in first] == ["ok", "http_404", "timeout", "not_an_image", "ok"]
    before = dict(server.hits)
    blob_path(tmp_path / "store", first[4]["sha256"]).unlink()  # a stored file that went missing
    previous = {r["image_id"]: r for r in first}
    second = _run(server, paths, tmp_path, DownloadSettings(**{**SETTINGS.__dict__, "retries": 0}), previous)
    fetched = {p for p in paths if server.hits.get(p, 0) > before.get(p, 0)}
    assert fetched == {"/slow", "/img/2"}
    assert second[0] == first[0] and second[1] == first[1] and second[3] == first[3]
    assert second[4]["status"] == "ok" and blob_path(tmp_path / "store", second[4]["sha256"]).is_file()
    # A changed URL for the same id is fetched again.
    previous = {r["image_id"]: r for r in second}
    third = download_all([("id0", server.base + "/img/5")], tmp_path / "store", SETTINGS, previous)
    assert third[0]["sha256"] != first[0]["sha256"] and server.hits["/img/5"] == 1


def test_identical_images_are_stored_once(server, tmp_path):
    rows = _run(server, ["/same/1", "/same/2", "/same/3"], tmp_path)
    assert len({r["sha256"] for r in rows}) == 1
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == [blob_path(tmp_path / "store", rows[0]["sha256"])]


def test_per_host_limit_bounds_requests_in_flight(server, tmp_path):
    settings = DownloadSettings(**{**SETTINGS.__dict__, "concurrency": 8, "per_host": 2})
    rows = _run(server, [f"/count/{i}" for i in range(12)], tmp_path, settings)
    assert all(r["status"] == "ok" for r in rows)
    assert server.max_in_flight == 2


def test_invalid_urls_are_recorded_not_fetched(tmp_path):
    rows = download_all([("a", "ftp://example.invalid/x.jpg"), ("b", ""), ("c", "not a url")], tmp_path, SETTINGS)
    assert [r["status"] for r in rows] == ["invalid_url"] * 3
    assert all(r["attempts"] == 0 for r in rows)


def test_connection_refused_is_retryable(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    rows = download_all([("a", f"http://127.0.0.1:{port}/x.jpg")], tmp_path, SETTINGS, sleep=lambda s: None)
    assert rows[0]["status"] == "connection_error" and rows[0]["attempts"] == SETTINGS.retries + 1
    assert is_retryable("connection_error") and is_retryable("http_503") and not is_retryable("http_404")


def test_journal_survives_torn_lines(tmp_path):
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps({"image_id": "a", "url": "u", "status": "ok"}) + "\n" + '{"image_id": "b", "ur')
    assert list(read_journal(j)) == [("a", "u")]
