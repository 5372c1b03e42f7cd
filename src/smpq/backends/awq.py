"""Activation-aware per-input-channel weight scaling, after AWQ (Lin et al. 2023) / SmoothQuant.

Input channels with large activations matter most for the output, so their weights should be
rounded more finely. For scales s (in,), quantize W diag(s) and undo the scaling:

    W_eff = Q(W diag(s)) diag(1/s)       (used in place of W: the model needs no change)

Since X W_eff^T = (X diag(1/s)) Q(W diag(s))^T, this equals folding 1/s into the previous
op as AWQ does, for weight-only quantization (if activations are quantized too, the 1/s must
be folded into the previous op instead, so that X diag(1/s) is what gets quantized).
As in AWQ, s = act_absmean^alpha with alpha on a grid k / n_grid, k = 0..n_grid-1, clamped at
1e-4 and normalised so that max(s) * min(s) = 1 (the geometric middle of the range is 1; for
min-max scales this only matters numerically, Q(c W) = c Q(W)). The alpha minimising the
layer-wise objective tr(dW H dW^T) = 2/N ||X dW^T||^2 (dW = W_eff - W) is kept; with H the
inputs need not be stored. alpha = 0 gives s = 1, i.e. the plain quantizer, so the search
never does worse than it on the calibration data. Unlike AWQ, the error is measured at the
layer output (not the transformer block's) and there is no weight-clipping search.

The inner quantizer is any `(w, spec, h) -> Tensor`; it sees the scaled problem, whose input
Hessian is diag(1/s) H diag(1/s), so GPTQ composes exactly (`gptq_quantizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smpq.backends.gptq import GPTQConfig, gptq_quantize_weight
from smpq.backends.hessian import (
    hessian_from_inputs,
    output_error,
    output_error_from_inputs,
    require_stat,
)
from smpq.backends.rtn import rtn_quantize_weight
from smpq.errors import SmpqError
from smpq.spec import QuantSpec

__all__ = [
    "AWQConfig",
    "AWQResult",
    "WeightQuantizer",
    "awq_quantize",
    "awq_scales",
    "awq_then",
    "gptq_quantizer",
    "rtn_quantizer",
]

# (weight (out, in), spec, Hessian of that weight's inputs or None) -> fake-quantized weight
WeightQuantizer = Callable[[Tensor, QuantSpec, Tensor | None], Tensor]


@dataclass(frozen=True)
class AWQConfig:
    """n_grid: alphas k / n_grid for k < n_grid (AWQ's grid); min_scale: clamp of s before
    normalisation, so channels that never fire do not get a zero scale."""

    n_grid: int = 20
    min_scale: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise SmpqError(f"n_grid must be a positive integer, got {self.n_grid!r}")
        if not self.min_scale > 0:
            raise SmpqError(f"min_scale must be positive, got {self.min_scale}")

    @property
    def alphas(self) -> list[float]:
        return [k / self.n_grid for k in range(self.n_grid)]


@dataclass(frozen=True)
class AWQResult:
    """weight: W_eff (shape/dtype of W); scales: s (in,); error: objective at `alpha`;
    errors: the search quantizer's objective at every alpha of `alphas` (errors[0]: s = 1)."""

    weight: Tensor
    scales: Tensor
    alpha: float
    error: float
    alphas: tuple[float, ...]
    errors: tuple[float, ...]


def rtn_quantizer(w: Tensor, spec: QuantSpec, h: Tensor | None = None) -> Tensor:
    """RTN as a `WeightQuantizer` (ignores the Hessian)."""
    return rtn_quantize_weight(w, spec)


def gptq_quantizer(config: GPTQConfig = GPTQConfig()) -> WeightQuantizer:
    """GPTQ with `config` as a `WeightQuantizer` (needs the Hessian)."""

    def quantize(w: Tensor, spec: QuantSpec, h: Tensor | None = None) -> Tensor:
        if h is None:
            raise SmpqError("GPTQ needs the Hessian of the layer inputs")
        return gptq_quantize_weight(w, h, spec, config)

    return quantize


def awq_scales(act_absmean: Tensor, alpha: float, min_scale: float = 1e-4) -> Tensor:
    """s = clamp(act_absmean^alpha, min_scale) / sqrt(max * min); alpha = 0 gives exactly 1."""
    s = act_absmean.abs().pow(alpha).clamp_min(min_scale)
    return s / (s.max() * s.min()).sqrt()


def _objective(dw: Tensor, h: Tensor | None, x: Tensor | None) -> float:
    return float(output_error(dw, h) if h is not None else output_error_from_inputs(dw, x))


@torch.no_grad()
def awq_quantize(
    w: Tensor,
    spec: QuantSpec,
    act_absmean: Tensor,
    *,
    h: Tensor | None = None,
    x: Tensor | None = None,
    quantizer: WeightQuantizer = rtn_quantizer,
    search_quantizer: WeightQuantizer | None = None,
    config: AWQConfig = AWQConfig(),
) -> AWQResult:
    """Grid-search alpha for W (out, in); the error uses H when given, else inputs x (..., in).

    `search_quantizer` (default: `quantizer`) scores the alphas, e.g. RTN to pick the scales
    cheaply before one final GPTQ run; the result's `error` is always that of `quantizer`.
    """
    if w.dim() != 2:
        raise SmpqError(f"AWQ expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    n = w.shape[1]
    if act_absmean.shape != (n,):
        raise SmpqError(f"act_absmean must have shape ({n},), got {tuple(act_absmean.shape)}")
    if h is None and x is None:
        raise SmpqError("AWQ needs the layer-input Hessian h or calibration inputs x")
    if h is not None and tuple(h.shape) != (n, n):
        raise SmpqError(f"Hessian of shape {tuple(h.shape)} does not match weight in={n}")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = w.detach().to(dt)
    h_q = h if h is not None else hessian_from_inputs(x)  # as given, for the inner quantizer
    h_obj = None if h is None else h.to(dt)  # objective in W's precision: float32 is plenty
    absmean = act_absmean.detach().to(w.device, dt)

    def effective(alpha: float, qfn: WeightQuantizer) -> tuple[Tensor, Tensor, float]:
        s = awq_scales(absmean, alpha, config.min_scale)
        hs = h_q / (s[:, None] * s[None, :]).to(h_q.dtype)
        w_eff = qfn(wf * s, spec, hs).to(dt) / s
        return w_eff, s, _objective(w_eff - wf, h_obj, x)

    search = search_quantizer or quantizer
    alphas = config.alphas
    errors: list[float] = []
    best: tuple[int, Tensor, Tensor] | None = None  # (index, W_eff, s); ties: smallest alpha
    for a in alphas:
        w_eff, s, err = effective(a, search)
        errors.append(err if err == err else float("inf"))  # NaN never wins
        if best is None or errors[-1] < errors[best[0]]:
            best = (len(errors) - 1, w_eff, s)
    k, w_eff, s = best
    err = errors[k]
    if search is not quantizer:
        w_eff, s, err = effective(alphas[k], quantizer)
    return AWQResult(
        weight=w_eff.to(w.dtype),
        scales=s,
        alpha=alphas[k],
        error=err,
        alphas=tuple(alphas),
        errors=tuple(errors),
    )


def awq_then(
    quantizer: WeightQuantizer,
    search_quantizer: WeightQuantizer | None = None,
    config: AWQConfig = AWQConfig(),
) -> Callable[[Tensor, QuantSpec, Mapping[str, Any] | None], Tensor]:
    """A backend `(w, spec, stats) -> W_eff` running AWQ scaling before `quantizer`."""

    def backend(w: Tensor, spec: QuantSpec, stats: Mapping[str, Any] | None) -> Tensor:
        act = require_stat(stats, "act_absmean", "AWQ")
        h = require_stat(stats, "hessian", "AWQ")
        return awq_quantize(
            w,
            spec,
            act,
            h=h,
            quantizer=quantizer,
            search_quantizer=search_quantizer,
            config=config,
        ).weight

    return backend
