"""Fake-quantized Linear and Conv2d layers that hold one or several candidates.

A layer keeps ONE full-precision weight (shared by every candidate, as in EdMIPS) and lists
of weight candidates and input-activation candidates. Its output is

    y = op( sum_j c_a[j] * Qa_j(x),  sum_i c_w[i] * Qw_i(W) )
    c = softmax(alpha) * active          (inactive branches get 0; no renormalisation)

With one candidate per list this is an ordinary fixed-precision layer (c = [1]). With several
it is a supernet layer. Switching which branches are active only writes two small boolean
buffers, and each candidate's quantized weight is cached and recomputed only when the weight
(or a learned step) changes, so a search can evaluate thousands of configurations cheaply.
A layer with no active weight (or activation) branch uses `empty`: "zero" (the branch sum is
empty, the output is the bias: Shapley-NAS semantics) or "float" (fall back to full precision).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smpq.errors import SmpqError
from smpq.observers import ActQuantizer
from smpq.primitives import LSQWeightQuantizer, fake_quantize
from smpq.spec import QuantSpec

__all__ = ["EMPTY_MODES", "QuantConv2d", "QuantLayer", "QuantLinear", "WeightQuantizer"]

EMPTY_MODES = ("zero", "float")


class WeightQuantizer(nn.Module):
    """Weight fake-quantizer: max-abs scales, or an LSQ learned step when `learnable`."""

    def __init__(self, spec: QuantSpec | None, learnable: bool = False):
        super().__init__()
        self.spec = spec
        self.lsq = (
            LSQWeightQuantizer(spec) if learnable and spec is not None and not spec.is_float
            else None
        )

    def init_from(self, w: Tensor) -> None:
        if self.lsq is not None:
            self.lsq.init_from(w)

    def forward(self, w: Tensor) -> Tensor:
        if self.spec is None:
            return w
        if self.lsq is not None:
            return self.lsq(w)
        return fake_quantize(w, self.spec)

    def version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.parameters())


def _param_free_copy(dicts: dict) -> dict:
    return OrderedDict(dicts)


class QuantLayer:
    """Mixin with the candidate logic shared by QuantLinear and QuantConv2d."""

    weight: Tensor
    bias: Tensor | None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        mod: nn.Module,
        w_specs: Sequence[QuantSpec | None],
        a_specs: Sequence[QuantSpec | None],
        *,
        act_method: str = "mse",
        learnable: bool = False,
        empty: str = "zero",
    ) -> QuantLayer:
        """Swap `mod`'s class in a shallow copy: parameters are shared, not copied."""
        if isinstance(mod, QuantLayer):
            mod = mod.to_float()
        new = cls.__new__(cls)
        new.__dict__.update(mod.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
            if key in mod.__dict__:
                new.__dict__[key] = _param_free_copy(mod.__dict__[key])
        new._init_quant(w_specs, a_specs, act_method, learnable, empty)
        return new

    def _init_quant(self, w_specs, a_specs, act_method, learnable, empty) -> None:
        if not w_specs or not a_specs:
            raise SmpqError("a quantized layer needs at least one weight and one activation spec")
        if empty not in EMPTY_MODES:
            raise SmpqError(f"empty must be one of {EMPTY_MODES}, got {empty!r}")
        self.w_specs = list(w_specs)
        self.a_specs = list(a_specs)
        self.empty = empty
        self.renormalise = False
        self.calibrating = False
        self.w_quant = nn.ModuleList(WeightQuantizer(s, learnable) for s in self.w_specs)
        self.a_quant = nn.ModuleList(
            ActQuantizer(s, method=act_method, learnable=learnable) if s is not None
            else nn.Identity()
            for s in self.a_specs
        )
        dev = self.weight.device
        self.alpha_w = nn.Parameter(torch.zeros(len(self.w_specs), device=dev), False)
        self.alpha_a = nn.Parameter(torch.zeros(len(self.a_specs), device=dev), False)
        self.register_buffer("w_active", torch.ones(len(self.w_specs), dtype=torch.bool), False)
        self.register_buffer("a_active", torch.ones(len(self.a_specs), dtype=torch.bool), False)
        self._wcache: dict[int, tuple[tuple, Tensor]] = {}
        with torch.no_grad():
            for q in self.w_quant:
                q.init_from(self.weight)

    def to_float(self) -> nn.Module:
        """The plain float module back (shares parameters)."""
        base = self._float_class()
        new = base.__new__(base)
        new.__dict__.update(self.__dict__)
        new.__dict__["_parameters"] = OrderedDict(
            (k, v) for k, v in self._parameters.items() if k in ("weight", "bias")
        )
        new.__dict__["_modules"] = OrderedDict()
        new.__dict__["_buffers"] = OrderedDict()
        for key in ("w_specs", "a_specs", "empty", "renormalise", "calibrating", "_wcache"):
            new.__dict__.pop(key, None)
        return new

    # -- configuration ------------------------------------------------------------------
    def set_active(self, w_mask: Tensor | Sequence[bool], a_mask: Tensor | Sequence[bool]) -> None:
        """Switch branches on/off: two tiny buffer writes, no recomputation."""
        self.w_active.copy_(torch.as_tensor(w_mask, dtype=torch.bool))
        self.a_active.copy_(torch.as_tensor(a_mask, dtype=torch.bool))

    def mixing(self) -> tuple[Tensor, Tensor]:
        """Mixing coefficients softmax(alpha) * active for weights and activations.

        With `renormalise` (our option, not Shapley-NAS's) the active coefficients are
        rescaled to sum to one, so switching a branch off changes the mixture's quality but
        not its scale.
        """
        cw = torch.softmax(self.alpha_w, 0) * self.w_active
        ca = torch.softmax(self.alpha_a, 0) * self.a_active
        if self.renormalise:
            cw = cw / cw.sum().clamp_min(1e-12)
            ca = ca / ca.sum().clamp_min(1e-12)
        return cw, ca

    @property
    def n_candidates(self) -> tuple[int, int]:
        return len(self.w_specs), len(self.a_specs)

    # -- forward ------------------------------------------------------------------------
    def quantized_weight(self, i: int) -> Tensor:
        """Candidate i's fake-quantized weight; cached while the weight and step are unchanged."""
        q = self.w_quant[i]
        if torch.is_grad_enabled() and (self.weight.requires_grad or q.lsq is not None):
            return q(self.weight)
        key = (self.weight._version, self.weight.data_ptr(), q.version())
        hit = self._wcache.get(i)
        if hit is not None and hit[0] == key:
            return hit[1]
        wq = q(self.weight).detach()
        self._wcache[i] = (key, wq)
        return wq

    def _mixed(self, coeffs: Tensor, active: Tensor, branch, fallback: Tensor) -> Tensor:
        idx = torch.nonzero(active).flatten().tolist()
        if not idx:
            return torch.zeros_like(fallback) if self.empty == "zero" else fallback
        if len(coeffs) == 1:
            return branch(0)
        out = None
        for i in idx:
            term = coeffs[i] * branch(i)
            out = term if out is None else out + term
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            for q in self.a_quant:
                q(x)
            return self._op(x, self.weight)
        cw, ca = self.mixing()
        xq = self._mixed(ca, self.a_active, lambda j: self.a_quant[j](x), x)
        wq = self._mixed(cw, self.w_active, self.quantized_weight, self.weight)
        return self._op(xq, wq)

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        w = ",".join(s.label if s else "fp32" for s in self.w_specs)
        a = ",".join(s.label if s else "fp32" for s in self.a_specs)
        return f"{super().extra_repr()}, w=[{w}], a=[{a}]"


class QuantLinear(QuantLayer, nn.Linear):
    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self.bias)

    @staticmethod
    def _float_class() -> type[nn.Module]:
        return nn.Linear


class QuantConv2d(QuantLayer, nn.Conv2d):
    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return self._conv_forward(x, w, self.bias)

    @staticmethod
    def _float_class() -> type[nn.Module]:
        return nn.Conv2d
