"""Fetching URL sources: every URL ends as stored bytes or a recorded reason.

Threads (`concurrency` of them) fetch with `requests`, at most `per_host` at once per host.
429, 5xx, 408, timeouts, connection errors and truncated bodies are retried with exponential
backoff (Retry-After honoured, capped); other 4xx, wrong content types, oversize bodies, redirect
loops and non-image bytes are final. Bytes are stored once under their sha256
(`<store>/<aa>/<sha256>`, written atomically), so a URL is never fetched again once stored and
two URLs with the same image share one file. Results are journaled as they arrive, so a killed
run resumes with what it already fetched; a rerun fetches only what is missing or failed with a
retryable reason.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from bucket_assets.core.atomic import atomic_write_bytes
from bucket_assets.core.failpoints import failpoint
from bucket_assets.core.journal import append_row, read_rows

# Reasons a rerun tries again (and http_5xx); every other non-ok status is final.
RETRYABLE = frozenset({"timeout", "connection_error", "truncated", "http_429", "http_408"})
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def is_retryable(status: str) -> bool:
    return status in RETRYABLE or (status.startswith("http_5") and len(status) == 8)


def journal_path(store: str | os.PathLike, source: str) -> Path:
    """Where a source's fetched results are journaled until they are committed."""
    return Path(store) / f".journal-{source}.jsonl"


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = 16
    per_host: int = 4
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_bytes: int = 50_000_000
    max_redirects: int = 5
    user_agent: str = "bucket_assets"


@dataclass
class FetchResult:
    image_id: str
    url: str
    status: str  # ok, or the reason: http_404, timeout, too_large, not_an_image, ...
    detail: str | None = None
    http_status: int | None = None
    sha256: str | None = None
    bytes: int | None = None
    content_type: str | None = None
    attempts: int = 0
    final_url: str | None = None


def blob_path(store: str | os.PathLike, sha256: str) -> Path:
    return Path(store) / sha256[:2] / sha256


def looks_like_image(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def reusable(prev: dict | None, url: str, store: str | os.PathLike) -> bool:
    """A previous result stands when it is for the same URL and is final: stored bytes that are
    still there, or a reason that retrying would not change."""
    if not prev or prev.get("url") != url:
        return False
    if prev["status"] == "ok":
        p = blob_path(store, prev["sha256"])
        return p.is_file() and p.stat().st_size == prev["bytes"]
    return not is_retryable(prev["status"])


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, http_status: int | None = None, wait: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.http_status, self.wait = reason, detail, http_status, wait


class _Final(Exception):
    def __init__(self, reason: str, detail: str, http_status: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.http_status = reason, detail, http_status


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Downloader:
    """Fetches URLs into a content-addressed store; safe to use from many threads."""

    def __init__(self, store: str | os.PathLike, settings: DownloadSettings, sleep: Callable[[float], None] = time.sleep):
        self.store = Path(store)
        self.settings = settings
        self.sleep = sleep
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.max_redirects = self.settings.max_redirects
            s.headers["User-Agent"] = self.settings.user_agent
        return s

    def _host(self, url: str) -> threading.BoundedSemaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            sem = self._hosts.get(host)
            if sem is None:
                sem = self._hosts[host] = threading.BoundedSemaphore(self.settings.per_host)
            return sem

    def fetch(self, image_id: str, url: str) -> FetchResult:
        res = FetchResult(image_id, url, "ok")
        scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
        if scheme not in ("http", "https"):
            res.status, res.detail = "invalid_url", f"not an http(s) URL: {str(url)[:200]!r}"
            return res
        rng = random.Random(url)  # jitter that does not change from run to run
        for attempt in range(self.settings.retries + 1):
            res.attempts = attempt + 1
            try:
                with self._host(url):
                    data, ctype, final_url = self._get(url)
            except _Final as exc:
                res.status, res.detail, res.http_status = exc.reason, exc.detail, exc.http_status
                return res
            except _Retry as exc:
                res.status, res.detail, res.http_status = exc.reason, exc.detail, exc.http_status
                if attempt == self.settings.retries:
                    return res
                backoff = min(self.settings.max_backoff_s, self.settings.backoff_s * 2**attempt)
                wait = exc.wait if exc.wait is not None else backoff * (0.5 + rng.random() / 2)
                self.sleep(min(wait, self.settings.max_backoff_s))
                continue
            sha = hashlib.sha256(data).hexdigest()
            path = blob_path(self.store, sha)
            if not (path.is_file() and path.stat().st_size == len(data)):
                atomic_write_bytes(path, data, durable=False)
            res.status, res.detail, res.http_status = "ok", None, 200
            res.sha256, res.bytes, res.content_type, res.final_url = sha, len(data), ctype, final_url
            return res
        return res  # pragma: no cover - the loop always returns

    def _get(self, url: str) -> tuple[bytes, str | None, str]:
        import requests

        st = self.settings
        deadline = time.monotonic() + st.timeout_s
        try:
            with self._session().get(url, timeout=(st.timeout_s, st.timeout_s), stream=True) as r:
                code = r.status_code
                if code != 200:
                    detail = f"HTTP {code} from {r.url}"
                    if is_retryable(f"http_{code}"):
                        raise _Retry(f"http_{code}", detail, code, _retry_after(r.headers.get("Retry-After")))
                    raise _Final(f"http_{code}", detail, code)
                ctype = r.headers.get("Content-Type")
                base = (ctype or "").split(";")[0].strip().lower()
                if base and not (base.startswith("image/") or base in ("application/octet-stream", "binary/octet-stream")):
                    raise _Final("not_an_image", f"Content-Type {base}", code)
                length = r.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > st.max_bytes:
                    raise _Final("too_large", f"Content-Length {length} > {st.max_bytes}", code)
                chunks, total = [], 0
                for chunk in r.iter_content(65536):
                    total += len(chunk)
                    if total > st.max_bytes:
                        raise _Final("too_large", f"body exceeds {st.max_bytes} bytes", code)
                    if time.monotonic() > deadline:
                        raise _Retry("timeout", f"body not complete after {st.timeout_s}s", code)
                    chunks.append(chunk)
                data = b"".join(chunks)
                if not looks_like_image(data):
                    raise _Final("not_an_image", f"{len(data)} bytes that are not an image format", code)
                return data, ctype, r.url
        except (_Retry, _Final):
            raise
        except requests.exceptions.TooManyRedirects as exc:
            raise _Final("redirect_loop", f"more than {st.max_redirects} redirects: {exc}") from None
        except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise _Final("invalid_url", str(exc)[:300]) from None
        except requests.exceptions.Timeout as exc:
            raise _Retry("timeout", str(exc)[:300]) from None
        except requests.exceptions.ChunkedEncodingError as exc:
            raise _Retry("truncated", str(exc)[:300]) from None
        except requests.exceptions.ConnectionError as exc:
            raise _Retry("connection_error", str(exc)[:300]) from None
        except requests.exceptions.RequestException as exc:
            raise _Retry("connection_error", f"{type(exc).__name__}: {str(exc)[:300]}") from None


def read_journal(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """(image_id, url) -> latest journaled result."""
    return {(r["image_id"], r["url"]): r for r in read_rows(path) if "image_id" in r and "url" in r}


def pending(items: list[tuple[str, str]], previous: dict[str, dict], store: str | os.PathLike) -> list[int]:
    """Indices of the items that must be fetched: no reusable previous result."""
    return [i for i, (iid, url) in enumerate(items) if not reusable(previous.get(iid), url, store)]


def download_all(
    items: Iterable[tuple[str, str]],
    store: str | os.PathLike,
    settings: DownloadSettings,
    previous: dict[str, dict] | None = None,
    journal: str | os.PathLike | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_fetched: Callable[[dict], None] | None = None,
    fetch_many: Callable[[list[tuple[str, str]]], Iterable[dict]] | None = None,
    todo: list[int] | None = None,
) -> list[dict]:
    """One result row per (image_id, url), in input order. `previous` (image_id -> row) rows
    that are reusable are kept as they are; the rest are fetched, with at most a few times
    `concurrency` requests queued at once (memory stays flat however many URLs there are).
    Fetched results are appended to `journal` as they complete; `on_fetched` sees each.
    `fetch_many` (the todo (image_id, url) list -> rows in order) fetches elsewhere, e.g. on
    Celery workers; by default this process's threads fetch. `todo`: `pending(...)` if the
    caller already computed it (it stats every stored file)."""
    previous = previous or {}
    items = list(items)
    dl = Downloader(store, settings, sleep)
    todo_items = [(i, *items[i]) for i in (pending(items, previous, store) if todo is None else todo)]
    fetched: dict[int, dict] = {}
    jf = None
    if journal is not None and todo_items:
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
        jf = open(journal, "a", encoding="utf-8")
    window = 4 * settings.concurrency

    def record(i: int, row: dict) -> None:
        fetched[i] = row
        if jf is not None:
            append_row(jf, row)
        if on_fetched is not None:
            on_fetched(row)
        failpoint("fetched")

    try:
        if fetch_many is not None:
            for (i, _iid, _url), row in zip(todo_items, fetch_many([(iid, url) for _, iid, url in todo_items])):
                record(i, row)
            todo_items = []
        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            in_flight: dict = {}

            def done(futs) -> None:
                for fut in futs:
                    record(in_flight.pop(fut), asdict(fut.result()))

            for i, iid, url in todo_items:
                in_flight[pool.submit(dl.fetch, iid, url)] = i
                if len(in_flight) >= window:
                    finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                    done(finished)
            done(list(in_flight))
    finally:
        if jf is not None:
            jf.close()
    return [fetched[i] if i in fetched else previous[iid] for i, (iid, _) in enumerate(items)]
