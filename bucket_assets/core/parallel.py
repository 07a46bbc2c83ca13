"""A bounded, ordered process pool: results come back in input order, so output never
depends on the worker count."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(requested: int) -> int:
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    # One torch thread per worker: the pool is the parallelism; oversubscription only slows it.
    import torch

    torch.set_num_threads(1)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, chunksize: int = 8, min_items_for_pool: int = 16
) -> Iterator[R]:
    """map(fn, items) in input order; with workers > 1 a spawn-context pool of that size.

    Small inputs run inline: starting interpreters costs more than they would save.
    """
    items = list(items)
    if workers <= 1 or len(items) < min_items_for_pool:
        yield from map(fn, items)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=min(workers, len(items)), initializer=_init_worker) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)
