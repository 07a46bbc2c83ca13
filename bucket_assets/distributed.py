"""Scaling out: the heavy per-item work of a step (rendering images, fetching URLs, writing
shards) as Celery tasks that any number of worker machines run.

One Dagster run coordinates: it plans, sends chunks of items to the broker, gathers the results
in input order (so the output does not depend on which worker did what), journals them and is
the only process that writes the DuckDB catalog. Workers need the package, the broker URL and
the same paths (shared storage mounted at the same place); they never touch DuckDB or the Dagster
instance. Messages are JSON: a worker runs only the functions registered below.

    export BUCKET_ASSETS_CELERY_BROKER=redis://broker-host:6379/0
    celery -A bucket_assets.distributed worker --concurrency 8     # on every worker machine
    bucket-assets build                                            # on the coordinator
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
from typing import Callable, Iterable, Iterator

BROKER_ENV = "BUCKET_ASSETS_CELERY_BROKER"
CHUNK_ENV = "BUCKET_ASSETS_CELERY_CHUNK"


# name -> (function of a chunk of items, item -> JSON, JSON -> item). Only these run on workers.
def _render_codec():
    from bucket_assets.core.processing import RenderParams, RenderTask, render

    def run(tasks: list[RenderTask]) -> list[dict]:
        return [render(t) for t in tasks]

    def dec(d: dict) -> RenderTask:
        return RenderTask(**{**d, "params": RenderParams(**d["params"])})

    return run, dataclasses.asdict, dec


def _fetch_codec():
    from bucket_assets.core.download import DownloadSettings, download_all

    def run(items: list[tuple]) -> list[dict]:
        # One chunk shares its store and settings; its URLs are fetched concurrently.
        store, settings = items[0][2], items[0][3]
        return download_all([(i, u) for i, u, _, _ in items], store, settings)

    def enc(item) -> dict:
        image_id, url, store, settings = item
        return {"image_id": image_id, "url": url, "store": str(store), "settings": dataclasses.asdict(settings)}

    def dec(d: dict) -> tuple:
        return d["image_id"], d["url"], d["store"], DownloadSettings(**d["settings"])

    return run, enc, dec


def _shard_codec():
    from bucket_assets.core.publish import stage_planned_shard

    def run(items: list[dict]) -> list[dict]:
        return [stage_planned_shard(d) for d in items]

    # A sample's .txt and .json are UTF-8 text: strings in the JSON message, bytes again on the worker.
    def enc(plan: dict) -> dict:
        return {**plan, "samples": [{**s, "txt": s["txt"].decode(), "json": s["json"].decode()} for s in plan["samples"]]}

    def dec(plan: dict) -> dict:
        return {**plan, "samples": [{**s, "txt": s["txt"].encode(), "json": s["json"].encode()} for s in plan["samples"]]}

    return run, enc, dec


def _scan_codec():
    from bucket_assets.core.raw_index import ScanTask, scan_part

    # One part of a source file or directory: the worker scans it, probes its images and writes
    # the part's fragment itself; the message back is its small summary. No DuckDB here.
    def run(tasks: list[ScanTask]) -> list[dict]:
        return [scan_part(t) for t in tasks]

    return run, dataclasses.asdict, lambda d: ScanTask(**d)


FUNCTIONS: dict[str, Callable] = {"render": _render_codec, "fetch": _fetch_codec, "shard": _shard_codec,
                                  "scan": _scan_codec}


# Work that runs on this machine's process pool (CPU-bound); the rest runs in process.
POOLED = {"render", "scan"}

# Items per message or pool task where the default does not fit: a scan part is already a
# large piece of work (thousands of records), so each goes to its own worker and the pool is
# worth starting for two of them.
ONE_PER_TASK = {"scan"}

# Pool work that uses torch (the resize): only its workers import it and get one torch thread.
# A scan worker that imported torch for nothing held ~180 MB more while it scanned (issue 13).
TORCH = {"render"}


def run_one(name: str, item):
    """One item of a registered function, in a pool worker (the item is pickled, not JSON)."""
    return FUNCTIONS[name]()[0]([item])[0]


def run_chunk(name: str, payload: list[dict]) -> list:
    run, _enc, dec = FUNCTIONS[name]()
    return run([dec(d) for d in payload])


def _make_app(broker: str | None):
    from celery import Celery
    from celery.signals import worker_process_init

    app = Celery("bucket_assets", broker=broker, backend=broker)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True,  # a worker that dies mid-chunk leaves it for another
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # chunks go to idle workers, not to the first to ask
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
    )

    @worker_process_init.connect
    def _one_torch_thread(**_kw):
        from bucket_assets.core.parallel import _init_worker

        _init_worker()

    @app.task(name="bucket_assets.run_chunk")
    def run_chunk_task(name: str, payload: list[dict]) -> list:
        return run_chunk(name, payload)

    return app


# `celery -A bucket_assets.distributed worker` finds this.
app = _make_app(os.environ.get(BROKER_ENV)) if os.environ.get(BROKER_ENV) else None


class CeleryCompute:
    """Ordered map over Celery workers: chunks of `chunk` items, at most `window` chunks queued."""

    def __init__(self, broker: str, chunk: int = 16, window: int = 64, timeout_s: float = 3600.0):
        self.app = app if app is not None and app.conf.broker_url == broker else _make_app(broker)
        self.chunk, self.window, self.timeout_s = chunk, window, timeout_s

    def _check_workers(self) -> None:
        # Fail at once, naming the broker, instead of queueing work nobody will take.
        if not getattr(self, "_checked", False):
            if not self.app.control.ping(timeout=3.0):
                raise RuntimeError(f"no Celery worker answers on {self.app.conf.broker_url}: start "
                                   f"`celery -A bucket_assets.distributed worker` with {BROKER_ENV} set, or unset it")
            self._checked = True

    def map(self, name: str, items: Iterable) -> Iterator:
        """Results in input order; `items` is read lazily, at most `window` chunks queued."""
        from bucket_assets.core.parallel import _chunks

        _run, enc, _dec = FUNCTIONS[name]()
        chunks = _chunks(items, 1 if name in ONE_PER_TASK else self.chunk)
        first = next(chunks, None)
        if first is None:
            return
        self._check_workers()
        task = self.app.tasks["bucket_assets.run_chunk"]
        pending: collections.deque = collections.deque()
        for c in itertools.chain([first], chunks):
            pending.append(task.apply_async((name, [enc(x) for x in c])))
            if len(pending) >= self.window:
                yield from pending.popleft().get(timeout=self.timeout_s)
        while pending:
            yield from pending.popleft().get(timeout=self.timeout_s)


class LocalCompute:
    """The same interface on this machine: renders on the process pool, fetches on threads,
    shards in process."""

    def __init__(self, workers: int):
        self.workers = workers

    def map(self, name: str, items: Iterable) -> Iterator:
        """Results in input order; `items` is read lazily (a bounded window in flight)."""
        from bucket_assets.core.parallel import _chunks, _init_worker, ordered_map

        if name in ONE_PER_TASK:
            yield from ordered_map(functools.partial(run_one, name), items, self.workers, chunksize=1,
                                   min_items_for_pool=2, initializer=_init_worker if name in TORCH else None)
        elif name in POOLED:
            yield from ordered_map(functools.partial(run_one, name), items, self.workers, chunksize=4,
                                   initializer=_init_worker if name in TORCH else None)
        else:
            run, _enc, _dec = FUNCTIONS[name]()
            # URLs of one chunk are fetched concurrently; a shard plan is already a batch.
            for chunk in _chunks(items, 256 if name == "fetch" else 1):
                yield from run(chunk)
