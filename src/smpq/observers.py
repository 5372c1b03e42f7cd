"""Activation range calibration and the per-tensor activation fake-quantizer module.

Activations cannot be quantized from their own min/max at inference time (the range would
change per batch), so a range is fixed from calibration batches. The quantizer records running
min/max and a bounded uniform sample of values, then picks a range with one of:

- `minmax`: the full observed range (no clipping, coarse steps when outliers exist);
- `percentile`: clip to the q-th percentile (robust to a few outliers);
- `mse`: search a clipping ratio of the min/max range minimising the quantization MSE.

Symmetric specs (and every minifloat) get symmetric ranges ±max(|lo|, |hi|).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from smpq.errors import SmpqError
from smpq.primitives import (
    fake_quantize,
    learned_fake_quantize,
    lsq_grad_scale,
    qparams_from_range,
    quant_levels,
)
from smpq.spec import Granularity, QuantSpec

__all__ = [
    "CALIBRATION_METHODS",
    "ActQuantizer",
    "range_minmax",
    "range_mse",
    "range_percentile",
]

DEFAULT_RESERVOIR = 100_000


def _finite_flat(x: Tensor) -> Tensor:
    flat = x.detach().reshape(-1).float()
    return flat[torch.isfinite(flat)]


def _symmetrize(lo: float, hi: float) -> tuple[float, float]:
    a = max(abs(lo), abs(hi))
    return -a, a


def range_minmax(x: Tensor, symmetric: bool = False) -> tuple[float, float]:
    """(min, max) of the finite values of `x`, or ±max|x| when symmetric."""
    flat = _finite_flat(x)
    if flat.numel() == 0:
        raise SmpqError("cannot compute a range: no finite values")
    lo, hi = float(flat.min()), float(flat.max())
    return _symmetrize(lo, hi) if symmetric else (lo, hi)


def range_percentile(x: Tensor, q: float = 99.99, symmetric: bool = False) -> tuple[float, float]:
    """(100-q, q) percentiles of `x`; symmetric: ±(q-th percentile of |x|)."""
    if not 50.0 < q <= 100.0:
        raise SmpqError(f"percentile must be in (50, 100], got {q}")
    flat = _finite_flat(x)
    if flat.numel() == 0:
        raise SmpqError("cannot compute a range: no finite values")
    data = flat.double().cpu().numpy()
    if symmetric:
        a = float(np.percentile(np.abs(data), q))
        return -a, a
    return float(np.percentile(data, 100.0 - q)), float(np.percentile(data, q))


def range_mse(x: Tensor, spec: QuantSpec, n_grid: int = 100) -> tuple[float, float]:
    """The clipped range r * (min, max), r in {1/n, ..., 1}, with the least fake-quant MSE.

    r = 1 (plain min/max) is a candidate, so the result is never worse than `range_minmax`.
    Ties keep the wider range.
    """
    if n_grid < 1:
        raise SmpqError(f"n_grid must be >= 1, got {n_grid}")
    flat = _finite_flat(x)
    if flat.numel() == 0:
        raise SmpqError("cannot compute a range: no finite values")
    lo, hi = range_minmax(flat, symmetric=spec.symmetric)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    best, best_err = (lo, hi), float("inf")
    for i in range(n_grid, 0, -1):
        r = i / n_grid
        scale, zp = qparams_from_range(lo * r, hi * r, spec)
        err = float(torch.mean((fake_quantize(flat, spec, scale, zp) - flat) ** 2))
        if err < best_err:
            best, best_err = (lo * r, hi * r), err
    return best


@dataclass
class _Stats:
    """Calibration statistics: exact running min/max and a uniform sample of the values."""

    seed: int
    cap: int
    lo: float = float("inf")
    hi: float = float("-inf")
    seen: int = 0
    values: Tensor = field(default_factory=lambda: torch.empty(0))
    keys: Tensor = field(default_factory=lambda: torch.empty(0))
    gen: torch.Generator | None = None

    def update(self, x: Tensor) -> None:
        """Priority sampling: each value gets a uniform key; the `cap` smallest keys are kept,
        which is a uniform sample without replacement of everything seen so far."""
        flat = _finite_flat(x).cpu()
        if flat.numel() == 0:
            return
        if self.gen is None:
            self.gen = torch.Generator().manual_seed(self.seed)
        self.lo = min(self.lo, float(flat.min()))
        self.hi = max(self.hi, float(flat.max()))
        self.seen += flat.numel()
        keys = torch.cat([self.keys, torch.rand(flat.numel(), generator=self.gen)])
        values = torch.cat([self.values, flat])
        if keys.numel() > self.cap:
            idx = torch.topk(keys, self.cap, largest=False).indices
            keys, values = keys[idx], values[idx]
        self.keys, self.values = keys, values


def _method_minmax(st: _Stats, spec: QuantSpec, pct: float) -> tuple[float, float]:
    return _symmetrize(st.lo, st.hi) if spec.symmetric else (st.lo, st.hi)


def _method_percentile(st: _Stats, spec: QuantSpec, pct: float) -> tuple[float, float]:
    return range_percentile(st.values, pct, symmetric=spec.symmetric)


def _method_mse(st: _Stats, spec: QuantSpec, pct: float) -> tuple[float, float]:
    return range_mse(st.values, spec)


CALIBRATION_METHODS: dict[str, Callable[[_Stats, QuantSpec, float], tuple[float, float]]] = {
    "minmax": _method_minmax,
    "percentile": _method_percentile,
    "mse": _method_mse,
}


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with a calibrated (optionally learned) range.

    Flow: `start_calibration()` (or set `calibrating = True`), run calibration batches through
    `forward` (returns its input unchanged while recording), then `finish_calibration()`.
    With `learnable=True` the calibrated scale is the initial value of an LSQ step parameter.
    `scale`, `zero_point`, `range_lo`, `range_hi` and `calibrated` are in the state dict.
    """

    def __init__(
        self,
        spec: QuantSpec,
        method: str = "mse",
        learnable: bool = False,
        *,
        percentile: float = 99.99,
        reservoir_size: int = DEFAULT_RESERVOIR,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if spec.granularity is not Granularity.TENSOR:
            raise SmpqError(
                f"activation quantization is per tensor only, got {spec.granularity.value}"
            )
        if method not in CALIBRATION_METHODS:
            known = ", ".join(CALIBRATION_METHODS)
            raise SmpqError(f"unknown calibration method {method!r}; known: {known}")
        if reservoir_size < 1:
            raise SmpqError(f"reservoir_size must be >= 1, got {reservoir_size}")
        self.spec, self.method, self.learnable = spec, method, learnable
        self.percentile, self.reservoir_size, self.seed = percentile, reservoir_size, seed
        if learnable:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("range_lo", torch.zeros(()))
        self.register_buffer("range_hi", torch.zeros(()))
        self.register_buffer("calibrated", torch.tensor(False))
        self.calibrating = False
        self._stats: _Stats | None = None

    def start_calibration(self) -> None:
        """Enter calibrating mode with fresh statistics."""
        self._stats = None
        self.calibrating = True

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Record statistics of one batch (what `forward` does while calibrating)."""
        if self._stats is None:
            self._stats = _Stats(seed=self.seed, cap=self.reservoir_size)
        self._stats.update(x)

    def finish_calibration(self) -> tuple[float, float]:
        """Fix the range with the chosen method, leave calibrating mode; returns (lo, hi)."""
        st = self._stats
        if st is None or st.seen == 0:
            raise SmpqError("activation quantizer finished calibration without observing data")
        lo, hi = CALIBRATION_METHODS[self.method](st, self.spec, self.percentile)
        self.set_range(lo, hi)
        self.calibrating = False
        self._stats = None
        return lo, hi

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        """Fix the range [lo, hi] directly (bypassing calibration)."""
        lo, hi = float(lo), float(hi)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
            raise SmpqError(f"invalid activation range [{lo}, {hi}]")
        scale, zp = qparams_from_range(lo, hi, self.spec)
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zp.reshape(()) if zp is not None else torch.zeros(()))
        self.range_lo.fill_(lo)
        self.range_hi.fill_(hi)
        self.calibrated.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """Calibrating: record and return `x`. Otherwise fake-quantize with the fixed range."""
        if self.calibrating:
            self.observe(x)
            return x
        if not bool(self.calibrated):
            raise SmpqError(
                "activation quantizer used before calibration: run calibration batches and "
                "call finish_calibration(), or call set_range(lo, hi)"
            )
        zp = None if self.spec.symmetric else self.zero_point
        if not self.learnable:
            return fake_quantize(x, self.spec, self.scale, zp)
        return self._learned(x, zp)

    def _learned(self, x: Tensor, zp: Tensor | None) -> Tensor:
        """LSQ path; the gradient scale uses the per-sample feature count as in the paper."""
        features = x[0].numel() if x.dim() > 1 else x.numel()
        g = lsq_grad_scale(features, quant_levels(self.spec))
        step = self.scale.abs().clamp_min(torch.finfo(self.scale.dtype).tiny)
        xc = x if x.dtype == torch.float64 else x.float()
        return learned_fake_quantize(xc, step, self.spec, g, zp).to(x.dtype)

    def extra_repr(self) -> str:
        return f"spec={self.spec.label}, method={self.method}, learnable={self.learnable}"
