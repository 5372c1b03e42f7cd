"""Named weight-quantization backends with one signature, for the mixed-precision allocator.

Every backend is `(w, spec, stats) -> fake-quantized w` where `stats` is one layer's entry of
`collect_input_stats` ({"hessian", "act_absmean", ...}; None is fine for "rtn"). Backends never
touch the model: `quantize_linear_weights` returns new tensors for a plan of formats, so the
allocator can score many candidate formats per layer against the same float model.

| name     | needs                    | what                                             |
|----------|--------------------------|--------------------------------------------------|
| rtn      | nothing                  | round to nearest, min-max scales                 |
| gptq     | hessian                  | GPTQ with default `GPTQConfig`                   |
| awq_rtn  | hessian, act_absmean     | AWQ scale search, RTN inside                     |
| awq_gptq | hessian, act_absmean     | AWQ scale search scored with GPTQ itself (exact, |
|          |                          | n_grid GPTQ runs), GPTQ inside                   |

Use `functools.partial` on the `*_backend` functions (or `awq_then`) for other configs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from smpq.backends.awq import AWQConfig, WeightQuantizer, awq_then, gptq_quantizer, rtn_quantizer
from smpq.backends.gptq import GPTQConfig, gptq_quantize_weight
from smpq.backends.hessian import linear_layer, require_stat
from smpq.backends.rtn import rtn_quantize_weight
from smpq.errors import SmpqError
from smpq.spec import QuantSpec

__all__ = [
    "BACKENDS",
    "Backend",
    "awq_gptq_backend",
    "awq_rtn_backend",
    "get_backend",
    "gptq_backend",
    "quantize_linear_weights",
    "rtn_backend",
]

Stats = Mapping[str, Any]
Backend = Callable[[Tensor, QuantSpec, Stats | None], Tensor]


def rtn_backend(w: Tensor, spec: QuantSpec, stats: Stats | None = None) -> Tensor:
    """Round to nearest; calibration statistics are ignored."""
    return rtn_quantize_weight(w, spec)


def gptq_backend(
    w: Tensor, spec: QuantSpec, stats: Stats | None, config: GPTQConfig = GPTQConfig()
) -> Tensor:
    return gptq_quantize_weight(w, require_stat(stats, "hessian", "GPTQ"), spec, config)


def _awq(
    w: Tensor, spec: QuantSpec, stats: Stats | None, quantizer: WeightQuantizer, config: AWQConfig
) -> Tensor:
    return awq_then(quantizer, config=config)(w, spec, stats)


def awq_rtn_backend(
    w: Tensor, spec: QuantSpec, stats: Stats | None, config: AWQConfig = AWQConfig()
) -> Tensor:
    return _awq(w, spec, stats, rtn_quantizer, config)


def awq_gptq_backend(
    w: Tensor,
    spec: QuantSpec,
    stats: Stats | None,
    config: AWQConfig = AWQConfig(),
    gptq: GPTQConfig = GPTQConfig(),
) -> Tensor:
    return _awq(w, spec, stats, gptq_quantizer(gptq), config)


BACKENDS: dict[str, Backend] = {
    "rtn": rtn_backend,
    "gptq": gptq_backend,
    "awq_rtn": awq_rtn_backend,
    "awq_gptq": awq_gptq_backend,
}


def get_backend(backend: str | Backend) -> Backend:
    """A backend by name (or a callable, returned as is); unknown names list the known ones."""
    if callable(backend):
        return backend
    if backend not in BACKENDS:
        raise SmpqError(f"unknown PTQ backend {backend!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[backend]


@torch.no_grad()
def quantize_linear_weights(
    model: nn.Module,
    plan: Mapping[str, QuantSpec | None],
    backend: str | Backend = "rtn",
    stats: Mapping[str, Stats] | None = None,
) -> dict[str, Tensor]:
    """New fake-quantized weights {name: tensor} for the nn.Linear layers of `plan`.

    A None spec means "keep float" (the layer is skipped). The model is not modified; each
    tensor has its layer weight's shape, dtype and device.
    """
    fn = get_backend(backend)
    out: dict[str, Tensor] = {}
    for name, spec in plan.items():
        layer = linear_layer(model, name)
        if spec is None:
            continue
        if not isinstance(spec, QuantSpec):
            raise SmpqError(f"plan entry {name!r} must be a QuantSpec, got {type(spec).__name__}")
        w = layer.weight.detach()
        layer_stats = None if stats is None else stats.get(name)
        q = fn(w.clone(), spec, layer_stats)
        out[name] = q.to(device=w.device, dtype=w.dtype)
    return out
