"""Atomic file writes and cache publishing: a reader (or a killed run) never sees half a file.

The one place for "write to a temporary name, then rename": single files (`atomic_write`,
`atomic_write_text`, `atomic_write_bytes`, `atomic_save_safetensors`), whole cache folders
(`publish_dir`), and a command's output folder (`output_dir`), so a crash mid-write leaves the
old content, two runs filling the same cache entry at once leave one complete copy, and two
commands never write one output folder at once.

`output_dir(out)` in a picture (`keep` names the resumable state a command keeps in `out`):

    check out (a folder, writable; symlinks resolved; not a folder of the user's)
    -> lock <real out>.lock (exclusive, released when we exit)
    -> outputs written to .<name>.new/  ->  rename out to .<name>.old, .<name>.new to out
    -> carry `keep` entries (checkpoints) over from .<name>.old  ->  delete .<name>.old

Never deleted: anything smpq did not write. An existing folder without smpq's marker file
that holds more than resumable state is refused before any work, not replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from smpq.errors import SmpqError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_resumable",
    "disk_full",
    "output_dir",
    "parse_json",
    "publish_dir",
    "read_json",
    "read_safetensors",
    "safetensors_shapes",
]

# Bounds on the JSON files smpq reads (policies, resume states, configs, calibration lines):
# real ones are kilobytes to megabytes and a handful of levels deep. Without them a huge file
# is read whole, and deep nesting exhausts the recursion limit of json and its users.
JSON_MAX_BYTES = 16 * 2**20
JSON_MAX_DEPTH = 64
OUTPUT_MARKER = ".smpq-output"  # in a folder `output_dir` wrote: it may replace it whole


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # full, over quota, over `ulimit -f`
_DISK_FULL_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                   "File too large": errno.EFBIG}


def disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """`exc` as an OSError naming `path` if it says the disk (or quota, or `ulimit -f`) is full,
    else None; safetensors wraps the OS error in its own SafetensorError text."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        code, why = exc.errno, exc.strerror or os.strerror(exc.errno)
    else:
        code = next((c for t, c in _DISK_FULL_TEXT.items() if t in str(exc)), None)
        if code is None or type(exc).__name__ != "SafetensorError":
            return None
        why = os.strerror(code)
    name = path if path is not None else getattr(exc, "filename", None)
    return OSError(code, why, None if name is None else os.fspath(name))


def disk_full_message(exc: OSError, what: str = "nothing was changed") -> str:
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"no space left on device{where} ({exc.strerror}); {what}"


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = disk_full(exc, path)
        if full is not None:  # the previous file at `path` is untouched
            raise full from None
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


# -- bounded JSON ----------------------------------------------------------------------------

def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a repeated key is an error (json's default keeps the last)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise SmpqError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _depth(value: object, limit: int) -> int:
    """Nesting depth of parsed JSON (a flat object is 1), walked without recursion; the walk
    stops once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def parse_json(text: str | bytes, what: str, max_depth: int = JSON_MAX_DEPTH) -> object:
    """Parse JSON strictly, as an SmpqError naming `what` on any fault: nesting bounded
    (deep nesting would exhaust the recursion limit), duplicate keys rejected, a UTF-8 byte
    order mark accepted (editors write one)."""
    too_deep = f"{what} is nested more than {max_depth} levels deep"
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig")
        data = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise SmpqError(f"{what} is not text") from None
    except SmpqError as exc:
        raise SmpqError(f"{what} has a {exc}") from None
    except json.JSONDecodeError as exc:
        raise SmpqError(f"{what} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except RecursionError:
        raise SmpqError(too_deep) from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise SmpqError(f"{what} is not valid JSON: {exc}") from None
    if _depth(data, max_depth) > max_depth:
        raise SmpqError(too_deep)
    return data


def read_json(path: str | os.PathLike, what: str, max_bytes: int = JSON_MAX_BYTES,
              max_depth: int = JSON_MAX_DEPTH) -> object:
    """`parse_json` of a file, refused past `max_bytes` before it is read whole. `what` names
    the file in messages ("policy file" -> "policy file p.json is not valid JSON: ...")."""
    path = Path(path)
    what = f"{what} {path}"
    too_big = f"{what} is larger than {max_bytes / 2**20:g} MiB"
    try:
        if path.stat().st_size > max_bytes:
            raise SmpqError(too_big)
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as exc:
        raise SmpqError(f"cannot read {what}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise SmpqError(too_big)
    return parse_json(raw, what, max_depth)


# -- safetensors ---------------------------------------------------------------------------
# One checker for every weight file smpq reads (its own checkpoints, a user's Hugging Face
# folder): safetensors validates the header (length within the file, JSON, each tensor's
# shape x dtype = its byte range, the ranges covering the file) before it allocates anything;
# any fault, in whatever error type the library raises, is one SmpqError line.

def _safetensors_fault(path: Path, what: str, exc: BaseException) -> SmpqError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SmpqError(f"cannot read {what} {path}: {first}")


def safetensors_shapes(path: str | os.PathLike, what: str = "weights"
                       ) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, no tensor read (memory-mapped)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise _safetensors_fault(path, what, exc) from None


def read_safetensors(path: str | os.PathLike, what: str = "weights") -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU; a damaged file is one SmpqError."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...; never a traceback
        raise _safetensors_fault(path, what, exc) from None


# -- output folders ------------------------------------------------------------------------

def _real_path(out: str | os.PathLike) -> Path:
    """`out` absolute with every symlink resolved: the folder that is really written (and
    locked), so `--out LINK` and `--out TARGET` are one folder and the link stays a link."""
    if not os.fspath(out).strip():
        raise SmpqError("the output folder is an empty path; give a folder, e.g. --out runs/x")
    try:
        real = Path(os.path.abspath(out)).resolve()
        os.stat(real)
    except FileNotFoundError:
        pass
    except (RuntimeError, OSError) as exc:  # RuntimeError: pathlib's "Symlink loop"
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            raise SmpqError(f"output folder {out} cannot be used: {exc.strerror}") from None
        raise SmpqError(f"output folder {out} is a symlink loop; give a real folder") from None
    return real


def _ours(name: str, keep: tuple[str, ...]) -> bool:
    """An entry smpq's own resumable state may leave in a folder without the marker: a `keep`
    entry, or the temporary file of one that a kill interrupted mid-write."""
    tops = {Path(rel).parts[0] for rel in keep}
    return name in tops or any(name.startswith(f".{t}.") and name.endswith(".tmp")
                               for t in tops)


def _foreign(out: Path, keep: tuple[str, ...]) -> list[str]:
    """Entries of an existing folder `out` that smpq did not write (none if it holds the
    marker: a folder smpq made is replaced whole)."""
    if not out.is_dir() or (out / OUTPUT_MARKER).is_file():
        return []
    return sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir()
                  if not _ours(e.name, keep))


def check_output_dir(out: str | os.PathLike, keep: tuple[str, ...] = ()) -> Path:
    """Raise SmpqError unless `out` is (or can be made) a writable folder that smpq may fill;
    returns the real (absolute, symlinks resolved) folder.

    A folder that exists, lacks smpq's marker and holds anything but `keep` (the resumable
    state a killed run left) is the user's own: refused, never emptied. Cheap, so commands
    call it before any model loading or training."""
    shown = os.fspath(out)
    out = _real_path(out)
    if out.exists() and not out.is_dir():
        raise SmpqError(f"output folder {shown} is an existing file; give a folder path")
    probe = out
    while not probe.exists():  # the nearest existing ancestor is where folders get created
        probe = probe.parent
    if not probe.is_dir():
        raise SmpqError(f"cannot create output folder {shown}: {probe} is a file")
    for folder in {probe, out.parent} if out.exists() else {probe}:
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise SmpqError(f"output folder {shown} cannot be written: {folder} is read-only")
    _refuse_foreign(out, keep, shown)
    return out


def _refuse_foreign(out: Path, keep: tuple[str, ...], shown: str) -> None:
    foreign = _foreign(out, keep)
    if foreign:
        few = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                        else "")
        raise SmpqError(f"output folder {shown} already holds files smpq did not write ({few});"
                        " choose a new or empty folder (smpq never deletes what it did not "
                        "write)")


def check_resumable(method: str, out: str | os.PathLike,
                    states: tuple[str, ...]) -> None:
    """`--resume` with nothing to resume is refused (it would silently start afresh): `states`
    are the files (relative to `out`) a killed run of `method` leaves, none if it keeps none."""
    if not states:
        raise SmpqError(f"nothing to resume: {method} keeps no search state; run without "
                        "--resume")
    if not any((Path(out) / rel).is_file() for rel in states):
        raise SmpqError(f"nothing to resume: no {' or '.join(states)} in {os.fspath(out)}; "
                        "run without --resume")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<out>.lock` (the OS drops it if we die); remove it after."""
    lock = out.with_name(out.name + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SmpqError(f"output folder {out} is in use by another smpq run (pid {holder}); "
                            "wait for it to finish or choose another --out") from None
        try:  # the previous holder may have unlinked the file between our open and flock
            st = os.stat(lock)
            fresh = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            fresh = False
        if fresh:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # unlink while still locked, so a waiter's inode check sees it
        os.close(fd)


def _move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` (parents made) unless `src` is absent or `dst` already exists."""
    if (src.exists() or src.is_symlink()) and not (dst.exists() or dst.is_symlink()):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _recover(out: Path, old: Path, keep: tuple[str, ...]) -> None:
    """Finish a swap a killed run left half done: the previous output is restored or kept."""
    if not old.exists():
        return
    if not out.exists():
        os.replace(old, out)  # killed between the two renames: bring the previous output back
        return
    for rel in keep:  # killed after the swap: finish carrying the resumable state
        _move(old / rel, out / rel)
    _remove(old)


def _swap(stage: Path, out: Path, old: Path, keep: tuple[str, ...], whole: bool) -> None:
    """Put `stage` in place of `out`, carrying `keep` entries over from the old folder.

    `whole`: `out` held smpq's marker when it was claimed, so its other entries are a previous
    run's outputs and go. Otherwise it was new, empty or held only resumable state, and
    whatever appeared in it during the run (a cache, a file of the user's) is carried over:
    nothing smpq did not write is deleted."""
    if not out.exists():
        os.replace(stage, out)
        return
    os.replace(out, old)
    os.replace(stage, out)
    for rel in keep:
        _move(old / rel, out / rel)
    if not whole:
        for entry in old.iterdir():
            _move(entry, out / entry.name)
    _remove(old)


def _made_parents(out: Path) -> list[Path]:
    """The missing ancestors of `out` (deepest first), so a failed claim can remove them."""
    made = []
    for parent in out.parents:
        if parent.exists():
            break
        made.append(parent)
    return made


def _drop_empty(folders: list[Path]) -> None:
    """Remove each folder that is empty (deepest first): a failed run leaves no empty folder."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Claim `out` for one command; yield an empty staging folder for its final outputs.

    `out` is checked (`check_output_dir`: a folder of the user's is refused) and its real
    folder (symlinks resolved; a symlink stays a symlink) locked for the whole block: a second
    command on the same folder, by any name, fails at once with an SmpqError naming the
    holder's pid. On a clean exit the staging folder replaces `out`; the paths in `keep`
    (relative to `out`: checkpoints and caches that the command writes straight into `out` so
    that a killed run can resume) are carried over from the previous folder. On an exception
    (or a kill) the previous `out` is left as it was, and folders the claim created are
    removed if they stayed empty.
    """
    keep, shown = tuple(keep), os.fspath(out)
    out = check_output_dir(out, keep)
    made = [*([] if out.exists() else [out]), *_made_parents(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage, old = (out.parent / f".{out.name}.{part}" for part in ("new", "old"))
    done = False
    try:
        with _locked(out):
            _refuse_foreign(out, keep, shown)  # again, now that no other run can write it
            _recover(out, old, keep)  # .<name>.old is smpq's own: a swap a kill cut short
            whole = (out / OUTPUT_MARKER).is_file()
            _remove(stage)  # left by a run that was killed before its swap
            stage.mkdir()
            try:
                yield stage
                (stage / OUTPUT_MARKER).write_text("written by smpq; replaced whole on the "
                                                   "next run with this output folder\n")
                _swap(stage, out, old, keep, whole)
                done = True
            finally:
                _remove(stage)
    except BaseException as exc:
        full = disk_full(exc)
        if full is None:
            raise
        left = (f"{shown} keeps its previous outputs" if (out / OUTPUT_MARKER).is_file() else
                "nothing was written" if not out.exists() or not any(out.iterdir()) else
                f"{shown} holds no outputs")
        if any((out / rel).exists() for rel in keep):
            left += " (and the search state, to resume)"
        if full.filename and Path(full.filename).is_relative_to(stage):  # name the real file
            full.filename = os.path.join(shown, Path(full.filename).relative_to(stage))
        raise SmpqError(disk_full_message(full, left)) from None
    finally:
        if not done:
            _drop_empty(made)
