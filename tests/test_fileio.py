"""smpq.fileio: a crash mid-write keeps the old file; racing publishers leave one full folder."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from smpq.fileio import atomic_save_safetensors, atomic_write, atomic_write_text, publish_dir


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_write_keeps_old_text(tmp_path: Path, exc: type[BaseException]) -> None:
    path = tmp_path / "out.json"
    path.write_text("old", encoding="utf-8")

    def half_then_die(tmp: str) -> None:
        Path(tmp).write_text("new but trunc", encoding="utf-8")
        raise exc("killed")

    with pytest.raises(exc):
        atomic_write(path, half_then_die)
    assert path.read_text(encoding="utf-8") == "old"
    assert _leftovers(tmp_path) == []
    atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "new"
    assert (path.stat().st_mode & 0o777) == 0o644


def test_safetensors_round_trip_and_metadata(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7])}
    path = atomic_save_safetensors(tensors, tmp_path / "sub" / "m.safetensors", {"k": "v"})
    back = safetensors.torch.load_file(str(path))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_safetensors_crash_mid_write_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.safetensors"
    old = {"w": torch.ones(4)}
    atomic_save_safetensors(old, path)
    before = path.read_bytes()

    def partial_save(tensors, filename, metadata=None):  # a kill after some bytes hit the disk
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"w\":")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_safetensors({"w": torch.zeros(4)}, path)
    assert path.read_bytes() == before
    assert torch.equal(safetensors.torch.load_file(str(path))["w"], old["w"])
    assert _leftovers(tmp_path) == []


def _fill(folder: Path, tag: str) -> None:
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text(tag)
    (folder / "sub" / "b.txt").write_text(tag)
    (folder / "meta.json").write_text(tag)  # the marker, written last


def test_publish_dir_publishes_complete_shared_folder(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "entry"
    with publish_dir(final, "meta.json") as tmp:
        assert tmp.parent == final.parent and not final.exists()
        _fill(tmp, "x")
    assert {p.relative_to(final).as_posix() for p in final.rglob("*")} == {
        "a.txt", "sub", "sub/b.txt", "meta.json"}
    assert (final.stat().st_mode & 0o777) == 0o755
    assert ((final / "sub" / "b.txt").stat().st_mode & 0o777) == 0o644
    assert _leftovers(final.parent) == []


def test_publish_dir_crash_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError), publish_dir(final, "meta.json") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed before the marker")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_publish_dir_loser_keeps_winners_copy(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    with publish_dir(final, "meta.json") as slow:
        _fill(slow, "slow")
        with publish_dir(final, "meta.json") as fast:
            _fill(fast, "fast")
        # `fast` won the rename; `slow` now finds a complete folder there and drops its own.
    assert all(p.read_text() == "fast" for p in final.rglob("*.*"))
    assert list(tmp_path.iterdir()) == [final]


def test_publish_dir_refuses_debris_without_marker(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "a.txt").write_text("debris")
    with pytest.raises(OSError), publish_dir(final, "meta.json") as tmp:
        _fill(tmp, "new")
    assert (final / "a.txt").read_text() == "debris"
    assert list(tmp_path.iterdir()) == [final]


def test_concurrent_publishers_leave_one_complete_folder(tmp_path: Path) -> None:
    final, n = tmp_path / "entry", 8
    barrier, errors = threading.Barrier(n), []

    def publisher(i: int) -> None:
        try:
            with publish_dir(final, "meta.json") as tmp:
                _fill(tmp, f"writer{i}")
                barrier.wait()  # all staged before anyone renames
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tags = {p.read_text() for p in final.rglob("*.*")}
    assert len(tags) == 1  # every file from the same writer: one complete copy
    assert {p.relative_to(final).as_posix() for p in final.rglob("*")} == {
        "a.txt", "sub", "sub/b.txt", "meta.json"}
    assert list(tmp_path.iterdir()) == [final]
