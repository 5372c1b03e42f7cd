"""Small CPU-sized classifiers whose every conv/linear is a named nn.Conv2d / nn.Linear.

Quantization code wraps layers by their fully qualified name, so each nn.Conv2d / nn.Linear
module is called exactly once per forward and no weights go through functional calls.
Every model keeps `config = {"name": ..., "kwargs": {...}}` (JSON-friendly) so a checkpoint
can rebuild it with `model_from_config`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from smpq.errors import SmpqError

__all__ = [
    "MLP",
    "MODELS",
    "BasicBlock",
    "ResNet20",
    "SmallResNet",
    "build_model",
    "model_from_config",
]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SmpqError(f"{name} must be a positive integer, got {value!r}")
    return value


def _init_weights(model: nn.Module) -> None:
    """He init for convs (ReLU nets), unit BN, default Linear: the usual ResNet recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 64)
    ) -> None:
        super().__init__()
        _positive_int("in_features", in_features)
        _positive_int("num_classes", num_classes)
        widths = [_positive_int("hidden width", h) for h in hidden]
        self.config = {
            "name": "mlp",
            "kwargs": {"in_features": in_features, "num_classes": num_classes, "hidden": widths},
        }
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in widths:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU; 1x1 conv+BN shortcut when shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _ResNetBase(nn.Module):
    """stem conv-BN-ReLU -> blocks -> global average pool -> fc."""

    def _build(self, in_channels: int, num_classes: int, stem: int, plan: list[tuple]) -> None:
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.stages = nn.Sequential(
            *[nn.Sequential(*[BasicBlock(*b) for b in stage]) for stage in plan]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(plan[-1][-1][1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallResNet(_ResNetBase):
    """A 9-layer residual net for tiny images (8x8 digits): ~38k params at width 16.

    stem (w) -> block w->w -> block w->2w stride 2 (1x1 projection) -> block 2w->2w -> fc.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        for n, v in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            _positive_int(n, v)
        self.config = {
            "name": "small_resnet",
            "kwargs": {"in_channels": in_channels, "num_classes": num_classes, "width": width},
        }
        w = width
        plan = [[(w, w, 1)], [(w, 2 * w, 2), (2 * w, 2 * w, 1)]]
        self._build(in_channels, num_classes, w, plan)


class ResNet20(_ResNetBase):
    """ResNet-20 (He et al. 2016, CIFAR variant) with 1x1 conv projection shortcuts.

    Three stages of 3 basic blocks at widths w, 2w, 4w (stride 2 between stages):
    1 stem + 18 block convs + 2 projections + 1 fc = 22 quantizable layers.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        for n, v in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            _positive_int(n, v)
        self.config = {
            "name": "resnet20",
            "kwargs": {"in_channels": in_channels, "num_classes": num_classes, "width": width},
        }
        plan: list[list[tuple]] = []
        prev = width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            plan.append([(prev, w, stride), (w, w, 1), (w, w, 1)])
            prev = w
        self._build(in_channels, num_classes, width, plan)


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "small_resnet": SmallResNet,
    "resnet20": ResNet20,
}


def _check_kwargs(name: str, kwargs: dict) -> None:
    params = set(inspect.signature(MODELS[name].__init__).parameters) - {"self"}
    unknown = set(kwargs) - params
    if unknown:
        raise SmpqError(
            f"model {name!r} has no option(s) {sorted(unknown)}; options: {sorted(params)}"
        )


def model_from_config(config: dict) -> nn.Module:
    """Rebuild an (untrained) model from its `config` dict, e.g. one read from meta.json."""
    if not isinstance(config, dict) or not isinstance(config.get("kwargs"), dict):
        raise SmpqError(f"model config must be {{'name': ..., 'kwargs': {{...}}}}, got {config!r}")
    name = config.get("name")
    if name not in MODELS:
        raise SmpqError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    _check_kwargs(name, config["kwargs"])
    model = MODELS[name](**config["kwargs"])
    if "input_shape" in config:
        model.config["input_shape"] = list(config["input_shape"])
    return model


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model for inputs of shape (C, H, W).

    `seed` (optional) makes the initial weights reproducible without touching the global RNG.
    """
    if name not in MODELS:
        raise SmpqError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    shape = [int(s) for s in input_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise SmpqError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    _check_kwargs(name, kwargs)
    first = "in_features" if name == "mlp" else "in_channels"
    if first in kwargs or "num_classes" in kwargs:
        raise SmpqError(f"{first}/num_classes come from input_shape/num_classes; do not pass them")
    args = {first: math.prod(shape) if name == "mlp" else shape[0], "num_classes": num_classes}
    config = {"name": name, "kwargs": {**args, **kwargs}, "input_shape": shape}
    if seed is None:
        return model_from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return model_from_config(config)
