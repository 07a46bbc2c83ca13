"""Progress of long stages: done / total, rate and ETA, reported every few seconds.

A stage makes a `Progress` with a `report` callable (the Dagster shell passes its logger). Any
process can also register one listener (`set_listener`) that sees every update, which is how
`bucket-assets build` draws its progress bar while the job runs in its own process.
"""

from __future__ import annotations

import time
from typing import Callable

Listener = Callable[[str, int, int], None]  # (stage, done, total)
_listener: Listener | None = None


def set_listener(fn: Listener | None) -> None:
    global _listener
    _listener = fn


def format_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, stage: str, total: int, report: Callable[[str], None] | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.report, self.interval, self.clock = stage, total, report, interval, clock
        self.done = 0
        self.start = self.last = clock()
        if _listener is not None:
            _listener(stage, 0, total)

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = format_eta((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "-"
        return f"{self.stage}: {self.done}/{self.total} ({pct:.0f}%), {rate:.1f}/s, ETA {eta}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        if _listener is not None:
            _listener(self.stage, self.done, self.total)
        now = self.clock()
        if self.report is not None and now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self.report(self.line())

    def close(self) -> None:
        if self.report is not None and self.total:
            self.report(self.line().split(", ETA")[0] + f" in {format_eta(self.clock() - self.start)}")
