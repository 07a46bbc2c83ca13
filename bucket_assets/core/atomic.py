"""Atomic file output: write to a hidden temp file beside the target, fsync, rename.

A reader (or a killed run) never sees a half-written file under the final name.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from bucket_assets.core.failpoints import failpoint

TMP_PREFIX = ".tmp-"
_RUN_LOCK = ".lock"


@contextmanager
def atomic_writer(
    path: str | os.PathLike, durable: bool = True, unchanged: Callable[[], bool] | None = None,
    before_replace: Callable[[], None] | None = None,
) -> Iterator[BinaryIO]:
    """durable=False skips the fsync: the rename is still atomic for readers and for a killed
    process; only a power loss could leave an empty file, which callers must detect.
    `unchanged()`, asked once everything is written, may say the file in place already holds
    these bytes: then it is left untouched (same inode and mtime) and the temp file dropped.
    `before_replace()` runs once the temp file is complete and synced, just before the rename."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            failpoint("write", path.name)
            keep = unchanged is not None and unchanged()
            if durable and not keep:
                os.fsync(f.fileno())
        if keep:
            os.unlink(tmp)
        else:
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_writer(path, durable) as f:
        half = len(data) // 2
        f.write(data[:half])
        failpoint("write_half", Path(path).name)  # crash tests: die with half a file written
        f.write(data[half:])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_OUR_TEMP = re.compile(r"^" + re.escape(TMP_PREFIX) + r".+\.\d+\.\d+$")


def is_our_temp(name: str) -> bool:
    """A temp file atomic_writer made (`.tmp-<name>.<pid>.<thread>`): only these are ever
    removed as stale, never a user's file that merely starts with `.tmp-`."""
    return bool(_OUR_TEMP.match(name))


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = True) -> int:
    """Delete temp files a killed run left behind; returns how many."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in (d.rglob if recursive else d.glob)(f"{TMP_PREFIX}*"):
        if is_our_temp(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            n += 1
    return n


def locked_run_dir(root: str | os.PathLike, prefix: str) -> tuple[Path, int]:
    """A new staging dir `<root>/<prefix><uuid>` for a run, with the descriptor that holds its
    flock while the run lives; the dirs of runs that are gone (killed) are removed. Runs of other partitions may
    be staging beside it at the same time: a dir is stale only when its lock can be taken. The
    lock file is locked before it gets its name, so no dir is ever seen unlocked while in use."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{prefix}*"):
        if not old.is_dir() or old.is_symlink():
            continue
        try:
            fd = os.open(old / _RUN_LOCK, os.O_RDONLY)
        except OSError:
            continue  # being set up right now (or unreadable): not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its run is alive
        shutil.rmtree(old, ignore_errors=True)
        os.close(fd)
    d = root / f"{prefix}{uuid.uuid4().hex}"
    d.mkdir()
    tmp = d / f"{_RUN_LOCK}.new"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(tmp, d / _RUN_LOCK)
    return d, fd
