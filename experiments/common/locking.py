"""One process at a time: a lock file that every process (every rank, every node sharing the disk) takes.

Data preparation (download, extraction, feature cache) runs under :func:`exclusive`: the first process
does the work, the others wait on the lock -- not in a collective, so no process-group timeout can
fire however long the work takes -- and then find the result complete. The lock is an OS-level
``flock`` (the ``filelock`` package, a dependency of torch): it is released when its holder exits or
is killed, so a crashed process never leaves the others waiting. (Network filesystems without working
locks: prepare the data once beforehand, e.g. ``python -m experiments.asr download``.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["exclusive"]


@contextlib.contextmanager
def exclusive(lock_path: os.PathLike | str, what: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock ``lock_path`` (created when missing) for the ``with`` block; says so when it has to wait.

    Not re-entrant across two calls with the same path in one process (the second would wait forever):
    callers nest only locks of different names.
    """
    from filelock import FileLock, Timeout

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another process {what} (lock {lock_path})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
