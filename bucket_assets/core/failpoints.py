"""Fault injection for crash and full-disk tests: named points in the build that, when the
environment asks for it, kill the whole process group with SIGKILL or fail with ENOSPC.

    BUCKET_ASSETS_FAILPOINT=<action>:<point>[=<context>][@<n>]

action is `kill` (SIGKILL to the process group: the build and its workers die at once, as
when a machine or the OOM killer takes them), `enospc` (raise OSError ENOSPC, as a full
disk would) or `slow` (sleep SLOW_S on every hit from the n-th: a slow machine, so that
tests of work spreading over workers do not depend on how loaded the test machine is). The point fires on its n-th hit in a process (default 1; a full disk stays full, so `enospc` keeps firing after it) whose context equals
<context> when one is given. Unset (the normal case) every call is a single comparison.
Tests start the build in its own session so the kill reaches only the build.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "BUCKET_ASSETS_FAILPOINT"
SLOW_S = 0.25


def _parse(value: str | None) -> tuple[str, str, str | None, int] | None:
    if not value:
        return None
    action, _, rest = value.partition(":")
    rest, _, nth = rest.partition("@")
    point, eq, context = rest.partition("=")
    if action not in ("kill", "enospc", "slow") or not point:
        raise ValueError(f"{ENV}={value!r}: expected <kill|enospc|slow>:<point>[=<context>][@<n>]")
    return action, point, context if eq else None, int(nth or 1)


_ARMED = _parse(os.environ.get(ENV))
_hits = 0


def failpoint(point: str, context: str | None = None) -> None:
    """Fire the armed fault if this is its point (and context), on its n-th hit."""
    global _hits
    if _ARMED is None or _ARMED[1] != point:
        return
    action, _, want, nth = _ARMED
    if want is not None and want != context:
        return
    _hits += 1
    if _hits < nth or (action == "kill" and _hits > nth):
        return
    if action == "slow":
        time.sleep(SLOW_S)
        return
    if action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, f"No space left on device (failpoint {point})")
