"""A bounded, ordered process pool: results come back in input order, so output never
depends on the worker count."""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WorkerDied(RuntimeError):
    """A pool worker process ended without returning its chunk (killed, out of memory, crashed)."""


def resolve_workers(requested: int) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    # One torch thread per worker: the pool is the parallelism; oversubscription only slows it.
    import torch

    torch.set_num_threads(1)


def _run_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(x) for x in chunk]


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, chunksize: int = 8, min_items_for_pool: int = 16,
    window: int = 4, initializer: Callable[[], None] | None = _init_worker,
) -> Iterator[R]:
    """map(fn, items) in input order; with workers > 1 a spawn-context pool of that size.

    `items` is consumed lazily: at most `window` chunks per worker are in flight, so memory
    follows the window, not the input. Small inputs run inline: starting interpreters costs
    more than they would save. `initializer` runs once in each worker (default: one torch
    thread, which imports torch: about 180 MB per worker; None for work that needs no torch).
    A worker that dies raises `WorkerDied` at once: multiprocessing.Pool would replace it and
    wait forever for the chunk it held.
    """
    it = iter(items)
    head = list(itertools.islice(it, min_items_for_pool))
    if workers <= 1 or len(head) < min_items_for_pool:
        yield from map(fn, itertools.chain(head, it))
        return
    chunks = _chunks(itertools.chain(head, it), chunksize)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=initializer)
    pending: collections.deque[Future] = collections.deque()
    finished = False
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run_chunk, fn, chunk))
            if len(pending) >= workers * window:
                yield from _result(pending.popleft())
        while pending:
            yield from _result(pending.popleft())
        finished = True
    finally:
        # An early close or an error drops what is queued instead of computing it first.
        pool.shutdown(wait=True, cancel_futures=not finished)


def _result(future: Future) -> list:
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise WorkerDied(
            "a worker process of the local pool died before returning its work (killed, out of "
            "memory, or crashed); the build stopped there and a rerun resumes from what was recorded"
        ) from e


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
