"""Fake quantization math: tensors and a `QuantSpec` in, tensors out, no module state.

Every granularity is reduced to one 2-D "grouped view" whose rows each share one scale:

| granularity | grouped view of a tensor of shape (out, in, *k)                 |
|-------------|------------------------------------------------------------------|
| tensor      | (1, numel)  (any shape, including activations and 1-D tensors)   |
| channel     | (out, in*prod(k))                                                |
| group       | (out * ceil(in*prod(k) / g), g), last group zero-padded          |

Scales and zero points are shaped (rows, 1) so they broadcast on that view; a scalar works too.
Arithmetic runs in float32 (float64 for float64 inputs) and the result is cast back to the
input dtype, so half-precision inputs get the same grid as float32 ones.

GGUF block formats (`spec.is_block`) are quantized whole by `smpq.blockformats` (llama.cpp's
own scale search; no scale or zero point to pass in); their gradient is the plain
straight-through estimator (every value lies inside its block's range).

Gradients use a *clipped* straight-through estimator: d out / d x is 1 where x lies inside the
representable range and 0 where it was clipped. Scales computed by `choose_qparams` are treated
as constants; use the LSQ functions to learn them.

Why one module past ~400 lines: everything here works on the one grouped view above and shares
its rounding, range and straight-through conventions, so the whole fake-quant arithmetic (int
and minifloat grids, qparams, quantize/dequantize, LSQ) can be checked on one page. The LSQ
part at the end is the natural piece to move out if the module grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smpq.blockformats import fake_quantize_blocks
from smpq.errors import SmpqError
from smpq.spec import FLOAT_FORMATS, Granularity, MinifloatFormat, QuantSpec

__all__ = [
    "LSQWeightQuantizer",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "group_counts",
    "group_view",
    "int_range",
    "learned_fake_quantize",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "lsq_init_step",
    "minifloat_values",
    "qparams_from_range",
    "quantize",
    "quant_levels",
    "round_to_minifloat",
    "ungroup_view",
]

# A unit quantizer maps v = x / scale to (Q(v), inside-range mask), Q(v) in units of the scale.
UnitQuantizer = Callable[[Tensor], tuple[Tensor, Tensor]]


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range; 1 bit is the sign code (-1, 1) with no zero."""
    if bits == 1:
        if not symmetric:
            raise SmpqError("1-bit quantization is sign x scale and must be symmetric")
        return -1, 1
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def quant_levels(spec: QuantSpec) -> int:
    """Positive levels of a format (LSQ's Q_P); minifloats count their positive codes."""
    if spec.is_float:
        return 2 ** (spec.bits - 1) - 1
    return int_range(spec.bits, spec.symmetric)[1]


def _layout(shape: torch.Size, spec: QuantSpec) -> tuple[int, int, int, int]:
    """(outer rows, flattened row length, groups per row, group width) for a shape."""
    numel = math.prod(shape)
    if spec.granularity is Granularity.TENSOR:
        return 1, numel, 1, numel
    if len(shape) == 0:
        raise SmpqError(f"{spec.granularity.value} granularity needs at least a 1-D tensor")
    out = shape[0]
    rest = numel // out if out else 0
    if spec.granularity is Granularity.CHANNEL:
        return out, rest, 1, rest
    gs = int(spec.group_size)
    return out, rest, max(1, -(-rest // gs)), gs


def group_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """The 2-D view whose rows share one scale (the last group of a row is zero-padded)."""
    out, rest, ng, gs = _layout(x.shape, spec)
    flat = x.reshape(out, rest)
    pad = ng * gs - rest
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(out * ng, gs)


def ungroup_view(g: Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> Tensor:
    """Inverse of `group_view`: drop the padding and restore the original shape."""
    shape = torch.Size(shape)
    out, rest, ng, gs = _layout(shape, spec)
    flat = g.reshape(out, ng * gs)
    if ng * gs != rest:
        flat = flat[:, :rest]
    return flat.reshape(shape)


def group_counts(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> Tensor:
    """Real (unpadded) elements per row of the grouped view, shaped (rows, 1)."""
    out, rest, ng, gs = _layout(torch.Size(shape), spec)
    counts = torch.full((out, ng), gs, dtype=torch.long)
    counts[:, -1] = rest - (ng - 1) * gs
    return counts.reshape(-1, 1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rint(v: Tensor) -> Tensor:
    """Round half to even, exact for |v| < 2^(precision - 2) (2^22 in float32); callers clamp.

    Adding and subtracting 1.5 / eps makes IEEE addition do the rounding. `torch.round` gives
    the same result but measured >1000x slower on this project's (x86, CPU-only) machines.
    """
    magic = 1.5 / torch.finfo(v.dtype).eps
    return (v + magic) - magic


def _no_block(spec: QuantSpec, what: str) -> None:
    if spec.is_block:
        raise SmpqError(f"GGUF format {spec.fmt} has no {what}; use fake_quantize")


def _safe_scale(scale: Tensor) -> Tensor:
    """Replace zero/denormal scales so all-zero groups quantize to 0 instead of NaN."""
    return scale.clamp_min(torch.finfo(scale.dtype).tiny)


def minifloat_values(fmt: MinifloatFormat) -> Tensor:
    """Every finite value of a format, enumerated from its bit patterns (sorted, float64).

    Patterns above `max_value` (inf/NaN encodings) are dropped; +0 and -0 collapse to 0.
    """
    mags = []
    for e in range(2**fmt.exp_bits):
        for m in range(2**fmt.man_bits):
            frac = m / 2**fmt.man_bits
            if e == 0:
                mags.append(frac * 2.0 ** (1 - fmt.bias))
            else:
                mags.append((1.0 + frac) * 2.0 ** (e - fmt.bias))
    pos = sorted({v for v in mags if v <= fmt.max_value})
    vals = sorted({*pos, *(-v for v in pos)})
    return torch.tensor(vals, dtype=torch.float64)


def round_to_minifloat(x: Tensor, fmt: MinifloatFormat) -> Tensor:
    """Nearest value of `fmt` (ties to even mantissa), saturating at ±max_value; NaN stays NaN.

    Arithmetic, not a grid search: the quantum of |x| is 2^(floor(log2|x|) - man_bits), with
    the exponent floored at the smallest normal exponent so subnormals share its quantum.
    Rounding half to even on that quantum is the even-mantissa rule.
    """
    a = x.abs().clamp(max=fmt.max_value)
    _, exp = torch.frexp(a)  # a = m * 2^exp with m in [0.5, 1)
    e = (exp - 1).clamp_min(fmt.min_normal_exp)
    quantum = torch.exp2((e - fmt.man_bits).to(x.dtype))
    r = _rint(a / quantum) * quantum  # a / quantum <= 2^(man_bits + 1): _rint is exact
    return torch.where(torch.isnan(x), x, torch.copysign(r, x))


def _row_minmax(g: Tensor) -> tuple[Tensor, Tensor]:
    if g.shape[1] == 0:  # empty tensors: amin/amax would raise
        return g.new_zeros(g.shape[0], 1), g.new_zeros(g.shape[0], 1)
    return g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)


def _qparams_int(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        return _safe_scale(torch.maximum(lo.abs(), hi.abs()) / qmax), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range must contain 0 for an exact zero
    scale = _safe_scale((hi - lo) / (qmax - qmin))
    zp = _rint(torch.clamp(-lo / scale, qmin, qmax)) + 0.0  # + 0.0: no -0.0
    return scale, zp


def _qparams_float(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    amax = torch.maximum(lo.abs(), hi.abs())
    return _safe_scale(amax / spec.minifloat.max_value), None


_QPARAMS_FROM_RANGE = {"int": _qparams_int, **{name: _qparams_float for name in FLOAT_FORMATS}}


def qparams_from_range(
    lo: float | Tensor, hi: float | Tensor, spec: QuantSpec
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) that cover [lo, hi]; symmetric formats cover ±max(|lo|, |hi|).

    Returns float32 0-dim tensors for float bounds (tensors keep their shape).
    """
    _no_block(spec, "scales from a range")
    lo_t = torch.as_tensor(lo, dtype=torch.float32) if not isinstance(lo, Tensor) else lo
    hi_t = torch.as_tensor(hi, dtype=torch.float32) if not isinstance(hi, Tensor) else hi
    return _QPARAMS_FROM_RANGE[spec.fmt](lo_t, hi_t, spec)


@torch.no_grad()
def choose_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Min/max scales shaped (rows, 1) on the grouped view; zero point only for asymmetric int.

    1-bit uses mean|x| per group, the L2-optimal scale for sign quantization.
    """
    _no_block(spec, "min/max scales")
    g = group_view(x.detach().to(_compute_dtype(x)), spec)
    if spec.fmt == "int" and spec.bits == 1:
        counts = group_counts(x.shape, spec).to(g.device, g.dtype).clamp_min(1)
        return _safe_scale(g.abs().sum(dim=1, keepdim=True) / counts), None
    return qparams_from_range(*_row_minmax(g), spec)


def _grid_unit(qmin: int, qmax: int, zp: Tensor | None) -> UnitQuantizer:
    """Q(v): v rounded onto the integer codes [qmin, qmax] shifted by -zp.

    Clamping before rounding equals clamping after it (the bounds are integers) and keeps
    `_rint` in its exact range.
    """
    if zp is None:
        return lambda v: (_rint(torch.clamp(v, qmin, qmax)), (v >= qmin) & (v <= qmax))
    lo, hi = qmin - zp, qmax - zp
    return lambda v: (_rint(torch.clamp(v, lo, hi)), (v >= lo) & (v <= hi))


def _int_unit(spec: QuantSpec, zp: Tensor | None) -> UnitQuantizer:
    """Integer formats; 1 bit is sign (no zero) with the range [-1, 1] for the STE."""
    if spec.bits == 1:
        return lambda v: (torch.sign(v) + (v == 0).to(v.dtype), v.abs() <= 1)  # 0 -> +1
    return _grid_unit(*int_range(spec.bits, spec.symmetric), zp)


def _float_unit(spec: QuantSpec, zp: Tensor | None) -> UnitQuantizer:
    fmt = spec.minifloat
    return lambda v: (round_to_minifloat(v, fmt), v.abs() <= fmt.max_value)


_UNIT = {"int": _int_unit, **{name: _float_unit for name in FLOAT_FORMATS}}


class _ClippedSTE(torch.autograd.Function):
    """Forward: the quantized value exactly; backward: pass the gradient where not clipped."""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None, None


def _prepare(
    x: Tensor, spec: QuantSpec, scale: Tensor | None, zero_point: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Grouped view in compute dtype plus detached qparams on its device."""
    if scale is None:
        scale, zero_point = choose_qparams(x, spec)
    dt = _compute_dtype(x)
    g = group_view(x.to(dt), spec)
    scale = scale.detach().to(g.device, dt)
    if zero_point is not None:
        zero_point = zero_point.detach().to(g.device, dt)
    return g, scale, zero_point


def fake_quantize(
    x: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero_point: Tensor | None = None
) -> Tensor:
    """Quantize-dequantize `x` (same shape, dtype, device) with a clipped STE gradient.

    Without `scale`, min/max qparams are computed from `x` by `choose_qparams`. GGUF block
    formats take no scale: llama.cpp's quantizer chooses them per block.
    """
    if spec.is_block:
        if scale is not None or zero_point is not None:
            raise SmpqError(f"GGUF format {spec.fmt} chooses its own block scales; pass none")
        out = fake_quantize_blocks(x.detach(), spec.fmt)
        return _ClippedSTE.apply(x, out, torch.ones_like(x, dtype=torch.bool))
    g, s, zp = _prepare(x, spec, scale, zero_point)
    with torch.no_grad():
        q, mask = _UNIT[spec.fmt](spec, zp)(g / s)
        value = q * s
    out = _ClippedSTE.apply(g, value, mask)
    return ungroup_view(out, x.shape, spec).to(x.dtype)


def _code_dtype(qmin: int, qmax: int) -> torch.dtype:
    if qmin >= -(2**7) and qmax < 2**7:
        return torch.int8
    return torch.int16 if qmin >= -(2**15) and qmax < 2**15 else torch.int32


def quantize(x: Tensor, spec: QuantSpec, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """Integer codes of `x` (int8 when they fit, else int16), shaped like `x`. Integer only."""
    if spec.fmt != "int":
        raise SmpqError(f"integer codes exist only for fmt='int', not {spec.fmt}")
    g, s, zp = _prepare(x.detach(), spec, scale, zero_point)
    q, _ = _int_unit(spec, zp)(g / s)
    if zp is not None:
        q = q + zp
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    return ungroup_view(q, x.shape, spec).to(_code_dtype(qmin, qmax))


def dequantize(
    q: Tensor, spec: QuantSpec, scale: Tensor, zero_point: Tensor | None = None
) -> Tensor:
    """Float values of integer codes, in the scale's dtype (float32 scales give float32)."""
    if spec.fmt != "int":
        raise SmpqError(f"integer codes exist only for fmt='int', not {spec.fmt}")
    dt = torch.float64 if scale.dtype == torch.float64 else torch.float32
    g = group_view(q.to(dt), spec)
    s = scale.detach().to(g.device, dt)
    if zero_point is not None:
        g = g - zero_point.detach().to(g.device, dt)
    return ungroup_view(g * s, q.shape, spec)


class _LearnedStep(torch.autograd.Function):
    """out = s * Q(x / s). d/dx: 1 inside the range, else 0.

    d/ds (before the gradient scale g): Q(v) - v inside the range (round's derivative taken as
    1), Q(v) when clipped, i.e. qmin / qmax for integers exactly as in the LSQ paper.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, unit: UnitQuantizer, g: float) -> Tensor:
        v = x / step
        q, inside = unit(v)
        ctx.save_for_backward(v, q, inside)
        ctx.step_shape, ctx.g = step.shape, g
        return q * step

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, q, inside = ctx.saved_tensors
        mask = inside.to(grad.dtype)
        dstep = grad * torch.where(inside, q - v, q) * ctx.g
        return grad * mask, _sum_to_shape(dstep, ctx.step_shape), None, None


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to the (broadcastable) parameter's shape."""
    lead = t.dim() - len(shape)
    if lead > 0:
        t = t.sum(dim=tuple(range(lead)))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    if ones:
        t = t.sum(dim=ones, keepdim=True)
    return t.reshape(shape)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(numel * Q_P), balancing step and weight updates."""
    return 1.0 / math.sqrt(max(1, numel) * max(1, qmax))


def lsq_init_step(x: Tensor, qmax: int) -> Tensor:
    """LSQ's initial step 2 * mean|x| / sqrt(Q_P) (a 0-dim tensor)."""
    return 2.0 * x.detach().abs().mean() / math.sqrt(qmax)


def lsq_fake_quantize(
    x: Tensor,
    step: Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float,
    zero_point: Tensor | None = None,
) -> Tensor:
    """LSQ fake quantization of `x` on the integer grid [qmin, qmax] (codes, then times step).

    `step` must broadcast against `x` (a scalar, or (rows, 1) on a grouped view). The step is
    used as given; keep it positive (e.g. `step.abs()`) in the caller. Rounding is to nearest, so
    (qmin, qmax) = (-1, 1) is ternary; use `learned_fake_quantize` for 1-bit sign.
    """
    zp = None if zero_point is None else zero_point.detach().to(x.dtype)
    return _LearnedStep.apply(x, step, _grid_unit(qmin, qmax, zp), grad_scale)


def learned_fake_quantize(
    x: Tensor, step: Tensor, spec: QuantSpec, grad_scale: float, zero_point: Tensor | None = None
) -> Tensor:
    """LSQ-style learned-step fake quantization for any format of `spec` (incl. 1-bit, float).

    `x` is used as is (no grouped view): `step` must broadcast against it.
    """
    _no_block(spec, "learned steps")
    zp = None if zero_point is None else zero_point.detach().to(x.dtype)
    return _LearnedStep.apply(x, step, _UNIT[spec.fmt](spec, zp), grad_scale)


class LSQWeightQuantizer(nn.Module):
    """A weight fake-quantizer with a learned step per tensor / channel / group (integer only).

    The step is shaped (rows, 1) on the grouped view; it is (re)initialised by `init_from`, or on
    the first forward if that was not called. Asymmetric specs keep a fixed min/max zero point.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if spec.fmt != "int":
            raise SmpqError(f"LSQ weight quantization supports fmt='int' only, not {spec.fmt}")
        self.spec = spec
        self.step = nn.Parameter(torch.ones(1, 1))
        self.register_buffer("zero_point", torch.zeros(1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, w: Tensor) -> None:
        """Set the step from `w`: LSQ's 2 mean|w| / sqrt(Q_P) per row, mean|w| for 1 bit."""
        g = group_view(w.detach().float(), self.spec)
        counts = group_counts(w.shape, self.spec).to(g.device, g.dtype).clamp_min(1)
        mean_abs = g.abs().sum(dim=1, keepdim=True) / counts
        if self.spec.bits == 1:
            step = mean_abs
        elif self.spec.symmetric:
            step = 2.0 * mean_abs / math.sqrt(quant_levels(self.spec))
        else:
            step, zp = choose_qparams(w, self.spec)
            self.zero_point = zp.float()
        self.step = nn.Parameter(_safe_scale(step.float()).to(w.device))
        if self.spec.symmetric:
            self.zero_point = torch.zeros_like(self.step.data)
        self.initialized.fill_(True)

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantized `w` with gradients to `w` (clipped STE) and to the step (LSQ)."""
        if not bool(self.initialized):
            self.init_from(w)
        g = group_view(w.to(_compute_dtype(w)), self.spec)
        step = _safe_scale(self.step.abs().to(g.dtype))
        zp = None if self.spec.symmetric else self.zero_point
        gs = lsq_grad_scale(w.numel(), quant_levels(self.spec))
        out = learned_fake_quantize(g, step, self.spec, gs, zp)
        return ungroup_view(out, w.shape, self.spec).to(w.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Accept a step / zero point of a different shape (set by a previous `init_from`)."""
        step, zp = state_dict.get(prefix + "step"), state_dict.get(prefix + "zero_point")
        if step is not None and step.shape != self.step.shape:
            self.step = nn.Parameter(torch.empty_like(step, device=self.step.device))
        if zp is not None and zp.shape != self.zero_point.shape:
            self.zero_point = torch.empty_like(zp, device=self.zero_point.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"spec={self.spec.label}"
