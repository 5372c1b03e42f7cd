"""Model surgery: find quantizable layers, swap them for fake-quantized ones, calibrate.

Layers are addressed by fully qualified name (`model.named_modules()`); include/exclude take
shell-style patterns (`fnmatch`), e.g. exclude=["fc"] keeps the classifier in float.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from smpq.errors import SmpqError
from smpq.modules import QuantConv2d, QuantLayer, QuantLinear
from smpq.observers import ActQuantizer
from smpq.policy import Policy
from smpq.spec import QuantSpec

__all__ = [
    "QUANTIZABLE",
    "calibrate_",
    "dequantize_",
    "quant_layers",
    "quantizable_layers",
    "quantize_",
    "supernet_",
]

# Dispatch table: float module type -> its fake-quantized class.
QUANTIZABLE: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}


def _is_quantizable(mod: nn.Module) -> bool:
    return isinstance(mod, QuantLayer) or type(mod) in QUANTIZABLE


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantizable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Ordered {fqn: module} of the Linear/Conv2d layers (plain or already quantized)."""
    found = {n: m for n, m in model.named_modules() if n and _is_quantizable(m)}
    if include:
        found = {n: m for n, m in found.items() if _matches(n, include)}
    if exclude:
        found = {n: m for n, m in found.items() if not _matches(n, exclude)}
    if not found:
        raise SmpqError("the model has no quantizable layers (nn.Linear / nn.Conv2d) selected")
    return found


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Ordered {fqn: QuantLayer} of layers already swapped by quantize_/supernet_."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_finite(name: str, mod: nn.Module) -> None:
    for pname, p in mod.named_parameters(recurse=False):
        if not torch.isfinite(p).all():
            raise SmpqError(f"layer {name!r} has non-finite values in its {pname}")


def _wrap(model, name, mod, w_specs, a_specs, **kw) -> QuantLayer:
    base = mod.to_float() if isinstance(mod, QuantLayer) else mod
    _check_finite(name, base)
    new = QUANTIZABLE[type(base)].from_float(base, w_specs, a_specs, **kw)
    _swap(model, name, new)
    return new


def quantize_(
    model: nn.Module,
    policy: Policy,
    *,
    act_method: str = "mse",
    learnable: bool = False,
) -> nn.Module:
    """Apply a policy in place: every named layer gets its single weight/activation format.

    Layers the policy maps to None stay float. The policy is validated against the model
    first (unknown or missing layers are errors).
    """
    layers = quantizable_layers(model)
    policy.validate(list(layers))
    for name, choice in policy.layers.items():
        mod = layers[name]
        if choice is None:
            if isinstance(mod, QuantLayer):
                _swap(model, name, mod.to_float())
            continue
        _wrap(model, name, mod, [choice.weight], [choice.act],
              act_method=act_method, learnable=learnable)
    return model


def supernet_(
    model: nn.Module,
    w_specs: Sequence[QuantSpec | None],
    a_specs: Sequence[QuantSpec | None],
    *,
    layers: Sequence[str] | None = None,
    fixed: Policy | None = None,
    act_method: str = "mse",
    learnable: bool = False,
    empty: str = "zero",
) -> nn.Module:
    """Give each searched layer every candidate; layers in `fixed` get their fixed choice.

    Searched layers default to every quantizable layer that `fixed` does not name.
    """
    all_layers = quantizable_layers(model)
    fixed_names = set(fixed.layers) if fixed is not None else set()
    names = list(layers) if layers is not None else [n for n in all_layers if n not in fixed_names]
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise SmpqError(f"unknown layer name(s): {', '.join(unknown)}")
    if fixed is not None:
        for name, choice in fixed.layers.items():
            if name not in all_layers:
                raise SmpqError(f"unknown layer name: {name}")
            if name in names or choice is None:
                continue
            _wrap(model, name, all_layers[name], [choice.weight], [choice.act],
                  act_method=act_method, learnable=learnable)
    for name in names:
        _wrap(model, name, all_layers[name], w_specs, a_specs,
              act_method=act_method, learnable=learnable, empty=empty)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo quantize_/supernet_: every QuantLayer back to its float module."""
    for name, mod in quant_layers(model).items():
        _swap(model, name, mod.to_float())
    return model


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Record activation statistics on float activations, then fix every range."""
    qlayers = list(quant_layers(model).values())
    acts = [q for layer in qlayers for q in layer.a_quant if isinstance(q, ActQuantizer)]
    was_training = model.training
    model.eval()
    for layer in qlayers:
        layer.calibrating = True
    for q in acts:
        q.calibrating = True
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for layer in qlayers:
            layer.calibrating = False
        for q in acts:
            q.calibrating = False
        model.train(was_training)
    if acts and not seen:
        raise SmpqError("calibration needs at least one batch of data")
    for q in acts:
        q.finish_calibration()
    return model
