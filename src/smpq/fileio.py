"""Atomic file writes and cache publishing: a reader (or a killed run) never sees half a file.

The one place for "write to a temporary name, then rename": single files (`atomic_write`,
`atomic_write_text`, `atomic_write_bytes`, `atomic_save_safetensors`) and whole cache folders
(`publish_dir`), so a crash mid-write leaves the old content, and two runs filling the same
cache entry at once leave one complete copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "publish_dir",
]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename over `path` (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: Path(p).write_bytes(data))


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """`safetensors.torch.save_file`, atomically. Tensors must be contiguous, unshared storages."""
    from safetensors.torch import save_file  # lazy: importing smpq.fileio must not load torch

    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda p: save_file(dict(tensors), p, metadata=meta))


@contextlib.contextmanager
def publish_dir(final: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield an empty staging folder next to `final`; on a clean exit rename it to `final`.

    `marker` names the file (written last by the caller) whose presence makes a folder
    complete. If another publisher renamed its copy first, that copy (complete by the same
    rule) is kept and ours is dropped; a folder at `final` without the marker is an error, and
    the caller should remove such debris before publishing. On an exception, or once
    published, the staging folder is removed: `final` is either absent or complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)  # mkdtemp makes 0700; caches are meant to be shared
        try:
            os.replace(tmp, final)  # fails if `final` is a non-empty folder
        except OSError:
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
