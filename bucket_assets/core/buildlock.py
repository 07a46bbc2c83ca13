"""One build of a spec at a time: an exclusive, non-blocking flock on `<work_dir>/.build.lock`.

Two builds of one work_dir would undo each other (each prunes the store packs the other's rows
reference), so `bucket-assets build` takes this lock before it touches anything and a second
build refuses at once, naming the holder's pid. The kernel drops a flock when its holder exits,
however it exits (SIGKILL included), so a killed build never leaves a stale lock; the file
itself stays (removing it would let a waiter and a newcomer lock two different files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".build.lock"


class BuildLockBusy(RuntimeError):
    """Another process holds the build lock of this work_dir."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        super().__init__(f"another build of this spec is running (pid {pid if pid is not None else '?'}; lock {path})")


def _holder_pid(fd: int) -> int | None:
    """The pid the holder wrote. It writes right after it locks, so an empty file (or the pid of
    a process that is gone: the file keeps the last holder's) is read again for a moment."""
    pid = None
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode("ascii", "replace")
        first = text.split("\n", 1)[0].strip()
        pid = int(first) if first.isdigit() else None
        if pid is not None:
            try:
                os.kill(pid, 0)
                return pid
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, another user's
                return pid
        time.sleep(0.01)
    return pid


class BuildLock:
    """`with BuildLock(work_dir): ...` or acquire()/release(). Raises BuildLockBusy when taken;
    creates work_dir if needed."""

    def __init__(self, work_dir: str | os.PathLike):
        self.path = Path(work_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "BuildLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this BuildLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default) keeps spawned workers from inheriting the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise BuildLockBusy(self.path, _holder_pid(fd)) from None
            # Write first, then cut: a reader never sees an empty file from us, only old or new.
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def instance_creation_lock(dagster_home: str | os.PathLike) -> Iterator[None]:
    """Held (blocking, briefly) while a process opens the Dagster instance at `dagster_home`: two
    processes creating a new SQLite instance at once fail ("table ... already exists"). Builds of
    different specs may share one home; builds of one spec are already kept apart by BuildLock."""
    path = Path(dagster_home) / ".bucket_assets-instance.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
