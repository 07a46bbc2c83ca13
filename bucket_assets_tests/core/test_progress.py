"""Progress lines: done / total, rate, ETA, at most one per interval; the CLI's plain listener."""

from __future__ import annotations

import io

from bucket_assets.core import progress
from bucket_assets.core.progress import Progress, format_eta


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_reports_every_interval_with_rate_and_eta():
    clock, lines = Clock(), []
    p = Progress("render", 100, lines.append, interval=5.0, clock=clock)
    for _ in range(10):
        clock.t += 1.0
        p.advance(2)
    # 10 s at 2/s: one line at 5 s and one at 10 s
    assert lines == ["render: 10/100 (10%), 2.0/s, ETA 45s", "render: 20/100 (20%), 2.0/s, ETA 40s"]
    clock.t += 40
    p.advance(80)
    p.close()
    assert lines[-1] == "render: 100/100 (100%), 2.0/s in 50s"


def test_format_eta():
    assert [format_eta(s) for s in (0, 59.4, 61, 3599, 3600, 7325)] == ["0s", "59s", "1m01s", "59m59s", "1h00m", "2h02m"]


def test_listener_sees_every_update_and_cli_prints_plain_lines_off_a_terminal():
    from bucket_assets.cli import _progress_listener

    stream = io.StringIO()
    seen = []
    listen = _progress_listener(stream, interval=0.0)
    progress.set_listener(lambda *a: (seen.append(a), listen(*a)))
    try:
        p = Progress("stage", 3)
        for _ in range(3):
            p.advance()
    finally:
        progress.set_listener(None)
    assert seen == [("stage", 0, 3), ("stage", 1, 3), ("stage", 2, 3), ("stage", 3, 3)]
    assert stream.getvalue().splitlines() == ["stage: 1/3 (33%)", "stage: 2/3 (66%)", "stage: 3/3 (100%)"]
