"""Process memory as the OS counts it (resident set size), for reports such as summary.json.

tracemalloc does not see torch's allocations, so these read the kernel's numbers: the peak
from getrusage (ru_maxrss: KiB on Linux, bytes on macOS), the current RSS from /proc on Linux.
"""

from __future__ import annotations

import resource
import sys

from torch import nn

__all__ = ["current_rss_bytes", "model_bytes", "peak_rss_bytes", "release_free_memory"]


def _status(field: str) -> int | None:
    """A size field of /proc/self/status in bytes (None where /proc is absent)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had so far, in bytes: the larger of
    getrusage's and /proc's VmHWM (getrusage may lag the latest pages by a little)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return int(max(peak, _status("VmHWM") or 0))


def current_rss_bytes() -> int | None:
    """The resident set size now, in bytes (None where /proc is absent)."""
    return _status("VmRSS")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each shared tensor once), as loaded."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Tensors of a few MiB are served from glibc's heap, which keeps them after they are freed:
    after a pass that frees hundreds of them (gradient moments) RSS stays high until trimmed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
