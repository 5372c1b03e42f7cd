"""Model surgery: find quantizable layers, swap them for fake-quantized ones, calibrate.

Layers are addressed by fully qualified name (`model.named_modules()`); include/exclude take
shell-style patterns (`fnmatch`), e.g. exclude=["fc"] keeps the classifier in float.

Which modules are quantizable: nn.Linear and nn.Conv2d, and their subclasses (a user's own
conv with a hook or extra attributes) when the quantized layer computes exactly what they do:

| subclass of nn.Linear / nn.Conv2d that ...             | quantized?                   |
|--------------------------------------------------------|------------------------------|
| adds attributes or instance hooks, keeps `forward`     | yes; kept, and `dequantize_` |
|                                                        | gives the user's class back  |
| overrides `forward` / `_conv_forward` (a fused op)     | no: would drop that op       |
| owns parameters, buffers or submodules beyond weight   | no: would drop them (weight  |
| and bias                                               | norm, parametrizations)      |
| is `nn.MultiheadAttention.out_proj`                    | no: its parent reads the     |
|                                                        | weight, never calls forward  |
| is an uninitialised lazy layer                         | no: no weight yet            |

`skipped_layers(model)` says, per module, why it is not quantized or not searched.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

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
    "skipped_layers",
    "supernet_",
]

# Dispatch table: float module type (and its reproducible subclasses) -> fake-quantized class.
QUANTIZABLE: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}
_FLOAT_CLASS = "_smpq_float_class"  # set on a QuantLayer: the user's class, for dequantize_


def _float_base(mod: nn.Module) -> type[nn.Module] | None:
    return next((base for base in QUANTIZABLE if isinstance(mod, base)), None)


def _subclass_problem(mod: nn.Module, base: type[nn.Module]) -> str | None:
    """Why QUANTIZABLE[base] cannot stand in for `mod` (a subclass of base), or None."""
    cls = type(mod)
    if cls is base:
        return None
    name = cls.__name__
    if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
        return f"{name} is an uninitialised lazy layer (run one forward pass first)"
    if isinstance(mod, NonDynamicallyQuantizableLinear):
        return f"{name}: its parent (nn.MultiheadAttention) reads the weight without forward()"
    for method in ("forward", "_conv_forward"):
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (f"{name} overrides {method}() of nn.{base.__name__}; the quantized layer "
                    "would drop that computation")
    extra = [k for k in mod._parameters if k not in ("weight", "bias")]
    extra += [*mod._buffers, *mod._modules]
    if extra:
        return (f"{name} holds {', '.join(extra)} beyond weight/bias, which the quantized layer "
                "would drop")
    return None


def _is_quantizable(mod: nn.Module) -> bool:
    if isinstance(mod, QuantLayer):
        return True
    base = _float_base(mod)
    return base is not None and _subclass_problem(mod, base) is None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def skipped_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    pinned: Mapping[str, object] | Iterable[str] | None = None,
) -> dict[str, str]:
    """{fqn: reason} for every module that holds a weight but is not quantized, or is not
    searched: an unsupported type (nn.Conv1d, nn.ConvTranspose2d, nn.Embedding, a user's own
    layer with a matrix parameter), a subclass the quantized layer cannot reproduce, a layer
    left out by the include/exclude patterns, or a pinned one. Norm layers (1-D weights) are
    not listed; parts of layers already quantized are not looked into."""
    pinned = dict(pinned) if isinstance(pinned, Mapping) else dict.fromkeys(pinned or ())
    out: dict[str, str] = {}
    inside: tuple[str, ...] = ()
    for name, mod in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(mod, QuantLayer):
            inside = (*inside, f"{name}.")
        base = _float_base(mod)
        if base is not None or isinstance(mod, QuantLayer):
            problem = None if isinstance(mod, QuantLayer) else _subclass_problem(mod, base)
            if problem is not None:
                out[name] = problem
                inside = (*inside, f"{name}.")  # its parametrizations etc. go with it
            elif include and not _matches(name, include):
                out[name] = f"not matched by include {list(include)}"
            elif exclude and _matches(name, exclude):
                out[name] = f"excluded by {[p for p in exclude if fnmatch.fnmatchcase(name, p)]}"
            elif name in pinned:
                label = getattr(pinned[name], "label", None)
                out[name] = f"pinned at {label}, not searched" if label else "pinned, not searched"
            continue
        mats = [k for k, p in mod._parameters.items() if p is not None and p.dim() >= 2]
        if mats:
            out[name] = (f"{type(mod).__name__} is not supported (nn.Linear, nn.Conv2d only); "
                         f"{', '.join(mats)} {'stays' if len(mats) == 1 else 'stay'} float")
    return out


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
        why = "; ".join(f"{n or '<model>'}: {r}" for n, r in
                        list(skipped_layers(model, include, exclude).items())[:4])
        raise SmpqError("the model has no quantizable layers (nn.Linear / nn.Conv2d) selected"
                        + (f" (skipped: {why})" if why else ""))
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


def _to_float(mod: QuantLayer) -> nn.Module:
    """The float module back in the user's own class (to_float alone gives nn.Linear/Conv2d)."""
    base = mod.to_float()
    cls = base.__dict__.pop(_FLOAT_CLASS, None)
    if cls is not None:
        base.__class__ = cls
    return base


def _wrap(model, name, mod, w_specs, a_specs, **kw) -> QuantLayer:
    base = _to_float(mod) if isinstance(mod, QuantLayer) else mod
    _check_finite(name, base)
    new = QUANTIZABLE[_float_base(base)].from_float(base, w_specs, a_specs, **kw)
    setattr(new, _FLOAT_CLASS, type(base))
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
                _swap(model, name, _to_float(mod))
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
        _swap(model, name, _to_float(mod))
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
