"""Silence a C library's prints: HiGHS (inside `scipy.optimize.milp`) writes solver chatter
straight to the process's stdout/stderr, below Python, so `disp=False` cannot stop it and it
lands in the middle of progress bars.

`quiet_solver()` points file descriptors 1 and 2 at /dev/null for the duration of a call and
restores them after, flushing Python's and C's buffers on both sides so that nothing printed
before is lost and nothing printed inside leaks out later. While it is active, other threads'
writes to fds 1 and 2 are dropped too (a progress bar misses a frame); a lock makes nested or
concurrent uses take turns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["quiet_solver"]

_LOCK = threading.RLock()


def _flush_all() -> None:
    """Flush Python's streams and every C stdio stream (fflush(NULL))."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def quiet_solver() -> Iterator[None]:
    """Drop everything written to fds 1 and 2 inside the block (C-level writes included)."""
    with _LOCK:
        _flush_all()
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no stdout/stderr to protect
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            yield
        finally:
            _flush_all()  # C-buffered chatter goes to /dev/null, not to the restored stream
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, devnull):
                os.close(fd)
