import os
import time

import pytest

from bucket_assets.core.parallel import WorkerDied, ordered_map


def _square(x: int) -> int:
    return x * x


def _die_on_seven(x: int) -> int:
    if x == 7:
        os._exit(3)  # a worker killed mid-chunk, as the OOM killer would
    return x


def _fail_on_five(x: int) -> int:
    if x == 5:
        raise ValueError("bad item 5")
    return x


def test_results_come_back_in_input_order_with_two_workers():
    assert list(ordered_map(_square, range(100), workers=2, chunksize=3, initializer=None)) == [
        x * x for x in range(100)]


def test_a_worker_that_dies_raises_instead_of_waiting_forever():
    start = time.monotonic()
    with pytest.raises(WorkerDied, match="worker process of the local pool died"):
        list(ordered_map(_die_on_seven, range(64), workers=2, chunksize=2, initializer=None))
    assert time.monotonic() - start < 60


def test_an_error_in_a_worker_reaches_the_caller_as_itself():
    with pytest.raises(ValueError, match="bad item 5"):
        list(ordered_map(_fail_on_five, range(64), workers=2, chunksize=2, initializer=None))


def test_closing_the_iterator_early_stops_the_pool():
    results = ordered_map(_square, range(10_000), workers=2, chunksize=4, initializer=None)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    results.close()  # must return promptly, not compute the remaining chunks
