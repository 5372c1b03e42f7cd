"""Ctrl-C while the `smpq` command loads its libraries (torch takes seconds): one line and
exit 130, not a KeyboardInterrupt traceback. Imported by smpq.cli before torch; `restore`
(called once smpq.cli is loaded) puts back the handler it replaced."""

from __future__ import annotations

import signal
import sys

__all__ = ["MESSAGE", "restore"]

MESSAGE = "interrupted while starting; nothing was written"


def _interrupted(signum, frame) -> None:
    sys.stderr.write(MESSAGE + "\n")
    sys.stderr.flush()
    raise SystemExit(130)


try:
    _PREVIOUS = signal.signal(signal.SIGINT, _interrupted)
except ValueError:  # imported outside the main thread: leave signals alone
    _PREVIOUS = None


def restore() -> None:
    if _PREVIOUS is not None and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, _PREVIOUS)
