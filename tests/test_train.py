"""Training, evaluation, distillation, checkpoints and the FP model cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

import smpq.cnn.train as train_mod
from smpq.cnn.data import Splits, load_digits_splits
from smpq.cnn.models import build_model
from smpq.cnn.train import (
    TrainConfig,
    distillation_loss,
    evaluate,
    fp_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)
from smpq.errors import SmpqError


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_digits_splits()


def _subset(ds: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in ds.tensors))


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", -1),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -1e-4),
        ("optimizer", "rmsprop"),
        ("momentum", 1.0),
        ("label_smoothing", 1.0),
        ("kd_weight", 1.5),
        ("kd_temperature", 0),
        ("seed", True),
    ],
)
def test_train_config_validation(field: str, value: object) -> None:
    with pytest.raises(SmpqError, match=field):
        TrainConfig(**{field: value})


def test_train_config_dict_round_trip() -> None:
    cfg = TrainConfig(epochs=3, optimizer="sgd", kd_weight=0.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SmpqError, match="unknown field"):
        TrainConfig.from_dict({"epochs": 1, "warmup": 2})


def test_small_resnet_learns_digits(digits: Splits) -> None:
    model = build_model("small_resnet", digits.input_shape, 10, seed=0)
    seen: list[int] = []
    cfg = TrainConfig(epochs=3, batch_size=64)
    history = train(
        model, digits.train, cfg, val_set=digits.val, progress=lambda e, total, m: seen.append(e)
    )
    assert seen == [1, 2, 3] and len(history) == 3
    assert {"train_loss", "train_acc", "val_acc", "val_loss", "seconds"} <= set(history[-1])
    acc, loss = evaluate(model, digits.val)
    assert acc == pytest.approx(history[-1]["val_acc"]) and acc > 0.8 and loss < 1.0


def test_training_is_deterministic_and_leaves_global_rng(digits: Splits) -> None:
    data = _subset(digits.train, 256)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=7)
    rng = torch.get_rng_state()
    states = []
    for _ in range(2):
        model = build_model("small_resnet", digits.input_shape, 10, seed=1)
        train(model, data, cfg)
        states.append(model.state_dict())
    assert torch.equal(torch.get_rng_state(), rng)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    model = build_model("small_resnet", digits.input_shape, 10, seed=1)
    train(model, data, TrainConfig(epochs=2, batch_size=32, seed=8))
    assert not torch.equal(model.fc.weight, states[0]["fc.weight"])


def test_evaluate_restores_mode_and_accepts_loaders(digits: Splits) -> None:
    model = build_model("mlp", digits.input_shape, 10)
    model.train()
    acc, _ = evaluate(model, digits.val)
    assert model.training and 0.0 <= acc <= 1.0
    model.eval()
    loader = torch.utils.data.DataLoader(digits.val, batch_size=100)
    assert evaluate(model, loader) == pytest.approx((acc, evaluate(model, digits.val)[1]))
    assert not model.training


def test_distillation_loss_matches_hand_computation() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    y = torch.tensor([1])
    temp, w = 2.0, 0.3

    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ce = -math.log(softmax([1.0, 2.0, 0.5])[1])
    ps = softmax([1.0 / temp, 2.0 / temp, 0.5 / temp])
    pt = softmax([0.0 / temp, 3.0 / temp, 1.0 / temp])
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    want = (1 - w) * ce + w * temp**2 * kl
    got = distillation_loss(s, y, t, kd_weight=w, temperature=temp)
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(distillation_loss(s, y)) == pytest.approx(ce, rel=1e-6)


def test_distillation_training_keeps_teacher_frozen(digits: Splits) -> None:
    data = _subset(digits.train, 128)
    teacher = build_model("mlp", digits.input_shape, 10, seed=0).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("mlp", digits.input_shape, 10, seed=1)
    cfg = TrainConfig(epochs=1, kd_weight=0.5, kd_temperature=3.0)
    train(student, data, cfg, teacher=teacher)
    assert teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    no_teacher = build_model("mlp", digits.input_shape, 10, seed=1)
    train(no_teacher, data, cfg)  # kd_weight without a teacher: plain cross-entropy
    plain = build_model("mlp", digits.input_shape, 10, seed=1)
    train(plain, data, TrainConfig(epochs=1))
    assert torch.equal(no_teacher.net[1].weight, plain.net[1].weight)
    assert not torch.equal(student.net[1].weight, plain.net[1].weight)


def test_checkpoint_round_trip(tmp_path: Path, digits: Splits) -> None:
    model = build_model("small_resnet", digits.input_shape, 10, seed=0)
    train(model, _subset(digits.train, 128), TrainConfig(epochs=1))  # non-trivial BN stats
    model.eval()
    save_checkpoint(tmp_path / "ck", model, {"note": "hi", "acc": 0.5})
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["note"] == "hi" and meta["model"]["name"] == "small_resnet"
    x = digits.test.tensors[0][:16]
    assert not loaded.training and torch.equal(model(x), loaded(x))
    into = build_model("small_resnet", digits.input_shape, 10)
    load_checkpoint(tmp_path / "ck", model=into)
    assert torch.equal(into.eval()(x), model(x))


def test_checkpoint_errors(tmp_path: Path) -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    ck = save_checkpoint(tmp_path / "ck", model, {})
    with pytest.raises(SmpqError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(SmpqError, match="mismatch|does not match"):
        load_checkpoint(ck, model=build_model("mlp", (1, 8, 8), 10, hidden=(16,)))
    meta = json.loads((ck / "meta.json").read_text())
    meta["model"]["kwargs"]["hidden"] = [128, 32]
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SmpqError, match="does not match"):
        load_checkpoint(ck)
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(SmpqError, match="corrupt"):
        load_checkpoint(ck)
    (ck / "model.safetensors").write_bytes(b"garbage")
    (ck / "meta.json").write_text(json.dumps({"model": model.config}))
    with pytest.raises(SmpqError, match="cannot read"):
        load_checkpoint(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(SmpqError, match="missing"):
        load_checkpoint(ck)
    with pytest.raises(SmpqError, match="config"):
        save_checkpoint(tmp_path / "raw", torch.nn.Linear(2, 2), {})


def test_nan_checkpoint_is_rejected(tmp_path: Path) -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    ck = save_checkpoint(tmp_path / "ck", model, {})
    state = load_file(str(ck / "model.safetensors"))
    state["net.3.weight"][0, 0] = float("nan")
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(SmpqError, match=r"non-finite weights in net\.3\.weight"):
        load_checkpoint(ck)


def test_fp_checkpoint_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(epochs=2, batch_size=64)
    first = fp_checkpoint("digits", "mlp", cfg, tmp_path, model_kwargs={"hidden": [32]})
    assert first.parent == tmp_path / "fp" and first.name.startswith("digits-mlp-")
    model, meta = load_checkpoint(first)
    assert meta["val_acc"] > 0.5 and meta["train_config"] == cfg.to_dict()
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache hit must not retrain")

    monkeypatch.setattr(train_mod, "train", no_training)
    again = fp_checkpoint("digits", "mlp", cfg, tmp_path, model_kwargs={"hidden": [32]})
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "fp").iterdir()] == [first.name]
    with pytest.raises(AssertionError, match="must not retrain"):  # other config: a new key
        fp_checkpoint("digits", "mlp", TrainConfig(epochs=3), tmp_path)
    with pytest.raises(SmpqError, match="unknown model"):
        fp_checkpoint("digits", "vgg", cfg, tmp_path)
