"""Training, evaluation, safetensors checkpoints and a content-hashed cache of FP models.

One `train` loop serves both float training and quantization-aware finetuning: it optimises
every parameter with requires_grad, so learnable quantizer steps are trained as well.
Weight decay applies only to tensors with >= 2 dims (conv/linear weights), never to BN
parameters, biases or scalar/per-channel quantizer steps, which decay would shrink.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from smpq.cnn.data import DATASETS, get_splits, make_loader
from smpq.cnn.models import MODELS, build_model, model_from_config
from smpq.errors import SmpqError
from smpq.fileio import (
    atomic_save_safetensors,
    atomic_write_text,
    publish_dir,
    read_safetensors,
)

__all__ = [
    "CODE_VERSION",
    "META_FILE",
    "WEIGHTS_FILE",
    "TrainConfig",
    "distillation_loss",
    "evaluate",
    "fp_cache_key",
    "fp_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
# Part of every FP cache key: bump when models/training change so stale caches are not reused.
CODE_VERSION = "smpq-fp-1"

Progress = Callable[[int, int, dict], None]


_INT_FIELDS = ("epochs", "batch_size", "seed")
_RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "epochs": ("an integer >= 0", lambda v: v >= 0),
    "batch_size": ("an integer >= 1", lambda v: v >= 1),
    "seed": ("an integer >= 0", lambda v: v >= 0),
    "lr": ("a number > 0", lambda v: v > 0),
    "weight_decay": ("a number >= 0", lambda v: v >= 0),
    "momentum": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "label_smoothing": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "kd_weight": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "kd_temperature": ("a number > 0", lambda v: v > 0),
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; defaults train SmallResNet on digits.

    optimizer: "adam" means AdamW (decoupled weight decay); "sgd" uses `momentum`.
    kd_weight: share of the Hinton distillation term (0 = plain cross-entropy).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    optimizer: str = "adam"
    momentum: float = 0.9
    seed: int = 0
    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0

    def __post_init__(self) -> None:
        for name, (rule, ok) in _RULES.items():
            v = getattr(self, name)
            is_int = isinstance(v, int) and not isinstance(v, bool)
            is_num = is_int or (isinstance(v, float) and math.isfinite(v))
            if not (is_int if name in _INT_FIELDS else is_num) or not ok(v):
                raise SmpqError(f"{name} must be {rule}, got {v!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise SmpqError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise SmpqError(f"a train config must be an object, got {type(d).__name__}")
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise SmpqError(f"unknown field(s) in train config: {sorted(extra)}")
        return cls(**d)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(
    model: nn.Module, dataset_or_loader: Dataset | DataLoader, batch_size: int = 512
) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) in eval mode; the caller's mode is restored."""
    loader = dataset_or_loader
    if not isinstance(loader, DataLoader):
        loader = make_loader(dataset_or_loader, batch_size, shuffle=False)
    device, was_training = _device(model), model.training
    correct, loss_sum, n = 0, 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise SmpqError("cannot evaluate on an empty dataset")
    return correct / n, loss_sum / n


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(1-w)*CE + w*T^2*KL(p_teacher^T || p_student^T) (Hinton et al. 2015), batch mean.

    T^2 keeps the soft-target gradients on the same scale as the hard-label ones.
    """
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None or kd_weight == 0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - kd_weight) * ce + kd_weight * t * t * kl


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SmpqError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    teacher: nn.Module | None,
) -> dict:
    """One pass over `loader`; returns train loss/accuracy averaged over samples."""
    device = _device(model)
    model.train()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
        loss = distillation_loss(
            logits, y, t_logits, cfg.kd_weight, cfg.kd_temperature, cfg.label_smoothing
        )
        if not torch.isfinite(loss):
            raise SmpqError("training diverged (non-finite loss); lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        n += len(y)
    return {"train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}


def train(
    model: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    val_set: Dataset | None = None,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Train in place with a per-step cosine LR schedule; returns one metrics dict per epoch.

    Deterministic under cfg.seed: the shuffling generator and the torch RNG (forked, so the
    caller's global RNG is untouched) are seeded from it. With a teacher and kd_weight > 0
    the loss is `distillation_loss` (teacher frozen in eval mode), otherwise cross-entropy.
    """
    if cfg.kd_weight > 0 and teacher is None:
        log.info("kd_weight=%g but no teacher given: plain cross-entropy", cfg.kd_weight)
    active_teacher = teacher if cfg.kd_weight > 0 else None
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    if len(loader) == 0:
        raise SmpqError("cannot train on an empty dataset")
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        opt = _optimizer(model, cfg)
        total_steps = max(1, cfg.epochs * len(loader))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if active_teacher is not None:
            active_teacher.eval()
        try:
            for epoch in range(1, cfg.epochs + 1):
                start = time.perf_counter()
                metrics = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
                metrics |= _run_epoch(model, loader, opt, sched, cfg, active_teacher)
                if val_set is not None:
                    metrics["val_acc"], metrics["val_loss"] = evaluate(model, val_set)
                metrics["seconds"] = time.perf_counter() - start
                history.append(metrics)
                log.debug("epoch %d/%d %s", epoch, cfg.epochs, metrics)
                if progress is not None:
                    progress(epoch, cfg.epochs, metrics)
        finally:
            model.train(was_training)
            if teacher is not None:
                teacher.train(teacher_was_training)
    return history


def save_checkpoint(directory: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write model.safetensors then meta.json ({**meta, "model": model.config}) atomically.

    meta.json is written last, so its presence marks a complete checkpoint.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise SmpqError("model has no `config`; build it with smpq.cnn.models.build_model")
    if "model" in meta:
        raise SmpqError("meta key 'model' is reserved for the model config")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            raise SmpqError(f"state entry {k!r} is not a tensor and cannot be saved")
        state[k] = v.detach().cpu().clone().contiguous()  # clone: no shared storage
    try:
        text = json.dumps({**meta, "model": config}, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SmpqError(f"checkpoint meta is not JSON-serialisable: {exc}") from None
    atomic_save_safetensors(state, directory / WEIGHTS_FILE)
    atomic_write_text(directory / META_FILE, text)
    return directory


def load_checkpoint(
    directory: str | Path, model: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    """(model in eval mode, meta dict) from a save_checkpoint folder; never unpickles.

    Without `model` it is rebuilt from meta["model"]; pass one (e.g. an already wrapped,
    quantized model) to load the weights into it instead.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SmpqError(f"checkpoint folder not found: {directory}")
    weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    for p in (weights, meta_path):
        if not p.is_file():
            raise SmpqError(f"checkpoint file missing: {p}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SmpqError(f"corrupt checkpoint meta {meta_path}: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise SmpqError(f"checkpoint meta {meta_path} has no 'model' config object")
    state = read_safetensors(weights, "checkpoint weights")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SmpqError(f"checkpoint has non-finite weights in {name}")
    if model is None:
        model = model_from_config(meta["model"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SmpqError(f"checkpoint {directory} does not match the model: {exc}") from None
    model.eval()
    return model, meta


def fp_cache_key(
    splits_name: str,
    model_name: str,
    cfg: TrainConfig,
    model_kwargs: dict | None = None,
    data_dir: str | None = None,
) -> str:
    """16 hex digits of sha256 over dataset, model, train config and CODE_VERSION."""
    payload = {
        "dataset": splits_name,
        "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else None,
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "train": cfg.to_dict(),
        "code": CODE_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fp_checkpoint(
    splits_name: str,
    model_name: str,
    cfg: TrainConfig,
    cache_dir: str | Path,
    data_dir: str | None = None,
    model_kwargs: dict | None = None,
    progress: Progress | None = None,
) -> Path:
    """Folder of a trained float model, training it only if no cached copy exists.

    Layout: <cache_dir>/fp/<dataset>-<model>-<key>/{model.safetensors, meta.json}, where
    key = fp_cache_key(...). A folder counts as cached when meta.json exists (written last).
    Training happens in a temp folder renamed into place, so concurrent runs never see a
    partial entry. Delete a folder to force retraining.
    """
    if splits_name not in DATASETS:  # also keeps the name safe as a folder name
        raise SmpqError(f"unknown dataset {splits_name!r}; known: {', '.join(sorted(DATASETS))}")
    if model_name not in MODELS:
        raise SmpqError(f"unknown model {model_name!r}; known: {', '.join(sorted(MODELS))}")
    kwargs = dict(model_kwargs or {})
    key = fp_cache_key(splits_name, model_name, cfg, kwargs, data_dir)
    root = Path(cache_dir).expanduser() / "fp"
    final = root / f"{splits_name}-{model_name}-{key}"
    if (final / META_FILE).is_file() and (final / WEIGHTS_FILE).is_file():
        log.info("using cached FP model %s", final)
        return final
    splits = get_splits(splits_name, data_dir)
    model = build_model(model_name, splits.input_shape, splits.num_classes, seed=cfg.seed, **kwargs)
    start = time.perf_counter()
    history = train(model, splits.train, cfg, val_set=splits.val, progress=progress)
    seconds = time.perf_counter() - start
    val_acc, val_loss = evaluate(model, splits.val)
    meta = {
        "dataset": splits_name,
        "model_name": model_name,
        "train_config": cfg.to_dict(),
        "cache_key": key,
        "code_version": CODE_VERSION,
        "history": history,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "train_seconds": seconds,
    }
    root.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (final / META_FILE).is_file():
        shutil.rmtree(final)  # debris of an interrupted manual copy; entries appear via rename
    with publish_dir(final, META_FILE) as tmp:  # another run finishing first keeps its copy
        save_checkpoint(tmp, model, meta)
    log.info("trained FP model %s: val acc %.4f in %.1fs", final, val_acc, seconds)
    return final
