"""GGUF block formats (llama.cpp's Q4_0 ... Q6_K, IQ4_NL) as torch fake quantization.

Each format cuts every row of a weight (dim 1 of an nn.Linear weight, the embedding dim of an
nn.Embedding) into blocks and stores per block a few fp16 numbers plus small integer codes:

| type   | block | bytes | bpw    | stored per block                                           |
|--------|-------|-------|--------|------------------------------------------------------------|
| q4_0   | 32    | 18    | 4.5    | d; codes 0..15, value d*(q-8)                              |
| q4_1   | 32    | 20    | 5.0    | d, m; codes 0..15, value d*q+m                              |
| q5_0   | 32    | 22    | 5.5    | d; codes 0..31, value d*(q-16)                             |
| q5_1   | 32    | 24    | 6.0    | d, m; codes 0..31, value d*q+m                              |
| q8_0   | 32    | 34    | 8.5    | d; codes -127..127, value d*q                              |
| iq4_nl | 32    | 18    | 4.5    | d; codes 0..15 into the non-linear grid `IQ4NL_VALUES`     |
| q2_k   | 256   | 84    | 2.625  | d, dmin; 16 x (4-bit scale, 4-bit min); codes 0..3         |
| q3_k   | 256   | 110   | 3.4375 | d; 16 x 6-bit signed scale; codes 0..7, value d*s*(q-4)    |
| q4_k   | 256   | 144   | 4.5    | d, dmin; 8 x (6-bit scale, 6-bit min); codes 0..15         |
| q5_k   | 256   | 176   | 5.5    | d, dmin; 8 x (6-bit scale, 6-bit min); codes 0..31         |
| q6_k   | 256   | 210   | 6.5625 | d; 16 x int8 scale; codes 0..63, value d*s*(q-32)          |

The quantizers port llama.cpp's reference code (ggml-quants.c of llama-cpp-python 0.3.36),
which is what `llama-quantize` runs without an importance matrix: `quantize_row_*_ref` for the
Q and K types; for IQ4_NL `quantize_iq4_nl` (the 7-step scale search; its `_ref` variant skips
the search). Arithmetic is float32 in the C order of operations (sums sequential, as C adds),
stored scales are rounded to fp16 exactly as `GGML_FP32_TO_FP16`. Only compiler FMA
contraction in a build of llama.cpp can still flip a rare tie. Work is vectorised over blocks;
the only Python loops run over positions inside a block or over the reference's search steps.

Why one module past ~400 lines: the eleven quantizers share the C-semantics helpers and the
table, and are checked together against gguf.quants, ggml-quants.c and llama-quantize; the
K-quant search helpers are the piece to move out if it grows.

`quantize_blocks(x, fmt)` returns the stored fields (codes and scales, see `FIELDS`) so that a
packer can write llama.cpp's bytes; `dequantize_blocks` turns them back into floats in the same
order of operations as `gguf.quants`; `fake_quantize_blocks` is the two together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from smpq.errors import SmpqError

__all__ = [
    "BLOCK_FORMATS",
    "FIELDS",
    "IQ4NL_VALUES",
    "BlockFormat",
    "available",
    "block_format",
    "dequantize_blocks",
    "fake_quantize_blocks",
    "quantize_blocks",
]

QK_K = 256
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_MAGIC = 12582912.0  # 1.5 * 2^23: nearest_int's rounding constant
_EPS = 1e-15  # GROUP_MAX_EPS


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block type: `block` weights stored in `type_bytes` bytes."""

    name: str
    block: int
    type_bytes: int
    nominal_bits: int

    @property
    def bpw(self) -> float:
        """True bits per weight, scales included (what a GGUF file stores)."""
        return 8.0 * self.type_bytes / self.block


BLOCK_FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("q4_0", 32, 18, 4),
    BlockFormat("q4_1", 32, 20, 4),
    BlockFormat("q5_0", 32, 22, 5),
    BlockFormat("q5_1", 32, 24, 5),
    BlockFormat("q8_0", 32, 34, 8),
    BlockFormat("iq4_nl", 32, 18, 4),
    BlockFormat("q2_k", QK_K, 84, 2),
    BlockFormat("q3_k", QK_K, 110, 3),
    BlockFormat("q4_k", QK_K, 144, 4),
    BlockFormat("q5_k", QK_K, 176, 5),
    BlockFormat("q6_k", QK_K, 210, 6),
)}

# The fields `quantize_blocks` returns per format (shapes for n blocks / super-blocks):
# d, dmin, m: (n,) fp16-representable float32; q: (n, block) codes; sc, mn: (n, sub-blocks).
FIELDS: dict[str, tuple[str, ...]] = {
    "q4_0": ("d", "q"), "q4_1": ("d", "m", "q"), "q5_0": ("d", "q"), "q5_1": ("d", "m", "q"),
    "q8_0": ("d", "q"), "iq4_nl": ("d", "q"), "q2_k": ("d", "dmin", "sc", "mn", "q"),
    "q3_k": ("d", "sc", "q"), "q4_k": ("d", "dmin", "sc", "mn", "q"),
    "q5_k": ("d", "dmin", "sc", "mn", "q"), "q6_k": ("d", "sc", "q"),
}


def block_format(fmt: str) -> BlockFormat:
    if fmt not in BLOCK_FORMATS:
        raise SmpqError(f"unknown GGUF block format {fmt!r}; known: {', '.join(BLOCK_FORMATS)}")
    return BLOCK_FORMATS[fmt]


def available(fmt: str, row_length: int) -> bool:
    """Whether llama.cpp can store rows of this length in `fmt` (whole blocks only)."""
    return row_length > 0 and row_length % block_format(fmt).block == 0


# -- float32 helpers with C semantics ---------------------------------------------------------

def _f16(t: Tensor) -> Tensor:
    """GGML_FP32_TO_FP16 then back: round to nearest even on fp16."""
    return t.to(torch.float16).to(torch.float32)


def _f32(v: float) -> float:
    """A Python float rounded to float32 (C's float constants and scalar arithmetic)."""
    return float(np.float32(v))


def _rdiv(num: float, t: Tensor) -> Tensor:
    """num / t correctly rounded (torch's `float / tensor` multiplies by a reciprocal)."""
    return torch.full_like(t, num) / t


def _nint(v: Tensor) -> Tensor:
    """nearest_int: round half to even through the 1.5 * 2^23 trick (a float result)."""
    return (v + _MAGIC) - _MAGIC


def _roundf(v: Tensor) -> Tensor:
    """C roundf: half away from zero, exact in float32."""
    a = v.abs()
    f = torch.floor(a)
    return torch.copysign(f + torch.floor(2 * (a - f)), v)


def _seqsum(t: Tensor) -> Tensor:
    """Sum over the last dim in index order, as a C loop accumulating a float does."""
    acc = t[..., 0]
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _signed_absmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max |x|, the first element reaching it) per row: C's `if (amax < fabsf(v))` scan."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    return mx.abs(), mx


def _safe_rdiv(num: float, d: Tensor) -> Tensor:
    """C's `d ? num/d : 0`."""
    return torch.where(d != 0, _rdiv(num, torch.where(d != 0, d, torch.ones_like(d))), 0.0)


def _safe_inv(d: Tensor) -> Tensor:
    return _safe_rdiv(1.0, d)


# -- 32-element types ---------------------------------------------------------------------------

def _q_sym(x: Tensor, div: float, offset: float, qmax: int) -> dict[str, Tensor]:
    """q4_0 / q5_0: d = (signed absmax) / -div, codes trunc(x/d + offset) capped at qmax."""
    _, mx = _signed_absmax(x)
    d = mx / -div
    q = torch.trunc(x * _safe_inv(d)[:, None] + offset).clamp(0, qmax)
    return {"d": _f16(d), "q": q}


def _q_affine(x: Tensor, qmax: int) -> dict[str, Tensor]:
    """q4_1 / q5_1: d = (max - min) / qmax, codes trunc((x - min)/d + 0.5), m = min."""
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    d = (hi - lo) / qmax
    q = torch.trunc((x - lo[:, None]) * _safe_inv(d)[:, None] + 0.5).clamp(0, qmax)
    return {"d": _f16(d), "m": _f16(lo), "q": q}


def _q8_0(x: Tensor) -> dict[str, Tensor]:
    d = x.abs().amax(dim=1) / 127
    return {"d": _f16(d), "q": _roundf(x * _safe_inv(d)[:, None])}


_IQ4 = torch.tensor(IQ4NL_VALUES, dtype=torch.float32)
_IQ4_BELOW = torch.cat([_IQ4[:1], _IQ4[:-1]])  # _IQ4_BELOW[mu] = _IQ4[mu - 1] for mu >= 1


def _iq4_pick(v: Tensor) -> tuple[Tensor, Tensor]:
    """best_index_int8: (index, grid value) nearest to v, ties to the upper one, clamped."""
    mu = torch.searchsorted(_IQ4, v.contiguous(), right=True).clamp_(1, 15)
    lo, hi = _IQ4_BELOW[mu], _IQ4[mu]
    lower = (v - lo) < (hi - v)
    return mu - lower.long(), torch.where(lower, lo, hi)


def _iq4_nl(x: Tensor, ntry: int = 7) -> dict[str, Tensor]:
    """quantize_row_iq4_nl_impl for one 32-block (no importance matrix: weights x^2).

    Works on the transposed (32, n_blocks) view, so the sequential sums add contiguous rows."""
    amax, mx = _signed_absmax(x)
    xt = x.T.contiguous()
    wt = xt * xt
    v0 = float(IQ4NL_VALUES[0])
    safe_mx = torch.where(amax < _EPS, torch.ones_like(mx), mx)

    def fit(idn: Tensor) -> tuple[Tensor, Tensor]:
        q = _iq4_pick(xt * idn)[1]
        wq = wt * q
        return _seqsum((wq * xt).T), _seqsum((wq * q).T)

    d = (-safe_mx / v0) if ntry > 0 else (safe_mx / v0)
    sumqx, sumq2 = fit(_rdiv(1.0, d))
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, 1.0), 0.0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sqx, sq2 = fit(_rdiv(itry + v0, safe_mx))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / torch.where(sq2 > 0, sq2, 1.0), d)
        best = torch.where(better, d * sqx, best)
    d = torch.where(amax < _EPS, 0.0, d)
    idx = _iq4_pick(x * _safe_inv(d)[:, None])[0]
    return {"d": _f16(d), "q": idx.to(torch.float32)}


# -- K-quant helpers (each row of x is one sub-block) --------------------------------------------

def _make_qkx2(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[Tensor, Tensor]:
    """make_qkx2_quants: (scale, the_min) of an affine fit x ~ scale*L - the_min, L in 0..nmax."""
    lo = x.amin(dim=1).clamp(max=0.0)
    hi = x.amax(dim=1)
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    flat = hi == lo

    def err(scale: Tensor, mn: Tensor, lv: Tensor) -> Tensor:
        diff = scale[:, None] * lv + mn[:, None] - x
        return _seqsum(w * (diff.abs() if use_mad else diff * diff))

    def levels(num: float, mn: Tensor) -> tuple[Tensor, Tensor]:
        # C reuses the running `min` (updated by every better fit) in the range and offset
        isc = _rdiv(num, torch.where(flat, torch.ones_like(hi), hi - mn))
        return isc, _nint(isc[:, None] * (x - mn[:, None])).clamp(0, nmax)

    mn = lo
    iscale, lv = levels(float(nmax), mn)
    scale = _rdiv(1.0, iscale)
    best = err(scale, mn, lv)
    for step in range(nstep + 1):
        _, lv = levels(_f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * step)) + nmax), mn)
        wl = w * lv
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lv), _seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(pos, 0.0, this_min)
        cur = err(this_scale, this_min, lv)
        take = ok & (cur < best)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, 0.0, scale)
    return scale, -torch.where(flat, lo, mn)


def _make_qx(x: Tensor, nmax: int) -> Tensor:
    """make_qx_quants with rmse_type=1 and no importance weights: the scale only."""
    amax, mx = _signed_absmax(x)
    zero = amax < _EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        lv = _nint(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        wl = w * lv
        return _seqsum(w * x * lv), _seqsum(wl * lv)

    sumlx, suml2 = fit(_rdiv(-float(nmax), mx))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        slx, sl2 = fit(_rdiv(-_f32(nmax + _f32(_f32(0.1) * step)), mx))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, slx / torch.where(sl2 > 0, sl2, 1.0), scale)
        best = torch.where(better, scale * slx, best)
    return torch.where(zero, 0.0, scale)


def _make_q3(x: Tensor, nmax: int) -> Tensor:
    """make_q3_quants with do_rmse: greedy per-element refinement (5 sweeps); the scale only."""
    amax, mx = _signed_absmax(x)
    zero = amax < _EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    lv = _nint(_rdiv(-float(nmax), mx)[:, None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _seqsum(w * x * lv), _seqsum(w * lv * lv)
    cols = [lv[:, i] for i in range(x.shape[1])]
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], cols[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = _nint(xi * sl2 / torch.where(slx > 0, slx, 1.0)).clamp(-nmax, nmax - 1)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = ((slx > 0) & (new != li) & (sl22 > 0)
                    & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
            cols[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(zero, 0.0, scale)


def _first_absmax(s: Tensor) -> Tensor:
    """The signed value of largest |s| per row (first one), 0 for an all-zero row."""
    return _signed_absmax(s)[1]


def _kquant_affine(x: Tensor, nsub: int, nmax: int, scale_max: int, rmin: float, nstep: int,
                   mad: bool, weights: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """q2_k / q4_k / q5_k: per sub-block affine fits, scales and mins quantized to 4 or 6 bits."""
    n = x.shape[0]
    xs = x.reshape(n * nsub, QK_K // nsub)
    scales, mins = _make_qkx2(xs, weights(xs), nmax, rmin, 0.1, nstep, mad)
    scales, mins = scales.reshape(n, nsub), mins.reshape(n, nsub)
    max_scale = scales.amax(dim=1).clamp(min=0.0)
    max_min = mins.amax(dim=1).clamp(min=0.0)
    inv_s, inv_m = _safe_rdiv(scale_max, max_scale), _safe_rdiv(scale_max, max_min)
    sc = _nint(inv_s[:, None] * scales).clamp(0, scale_max)
    mn = _nint(inv_m[:, None] * mins).clamp(0, scale_max)
    d, dmin = _f16(max_scale / scale_max), _f16(max_min / scale_max)
    dl = (d[:, None] * sc)[..., None]
    ml = (dmin[:, None] * mn)[..., None]
    xs = x.reshape(n, nsub, -1)
    q = _nint((xs + ml) / torch.where(dl != 0, dl, 1.0)).clamp(0, nmax)
    q = torch.where(dl != 0, q, 0.0)  # the reference leaves such codes unchanged: value -ml
    return {"d": d, "dmin": dmin, "sc": sc, "mn": mn, "q": q.reshape(n, QK_K)}


def _q2_k(x: Tensor) -> dict[str, Tensor]:
    return _kquant_affine(x, 16, 3, 15, -0.5, 15, True, torch.abs)


def _k_weights(xs: Tensor) -> Tensor:
    av = torch.sqrt(_seqsum(xs * xs) / xs.shape[1])
    return av[:, None] + xs.abs()


def _q4_k(x: Tensor) -> dict[str, Tensor]:
    return _kquant_affine(x, 8, 15, 63, -1.0, 20, False, _k_weights)


def _q5_k(x: Tensor) -> dict[str, Tensor]:
    return _kquant_affine(x, 8, 31, 63, -0.5, 15, False, _k_weights)


def _q3_k(x: Tensor) -> dict[str, Tensor]:
    n = x.shape[0]
    scales = _make_q3(x.reshape(n * 16, 16), 4).reshape(n, 16)
    max_scale = _first_absmax(scales)
    nz = max_scale != 0
    iscale = _rdiv(-32.0, torch.where(nz, max_scale, 1.0))
    sc = torch.where(nz[:, None], _nint(iscale[:, None] * scales).clamp(-32, 31), -32.0)
    d = torch.where(nz, _f16(_rdiv(1.0, iscale)), 0.0)
    dl = (d[:, None] * sc)[..., None]
    q = _nint(x.reshape(n, 16, 16) / torch.where(dl != 0, dl, 1.0)).clamp(-4, 3) + 4
    q = torch.where(dl != 0, q, 4.0)
    return {"d": d, "sc": sc, "q": q.reshape(n, QK_K)}


def _q6_k(x: Tensor) -> dict[str, Tensor]:
    n = x.shape[0]
    scales = _make_qx(x.reshape(n * 16, 16), 32).reshape(n, 16)
    max_scale = _first_absmax(scales)
    nz = max_scale.abs() >= _EPS
    iscale = _rdiv(-128.0, torch.where(nz, max_scale, 1.0))
    sc = torch.where(nz[:, None], _nint(iscale[:, None] * scales).clamp(max=127), 0.0)
    d = torch.where(nz, _f16(_rdiv(1.0, iscale)), 0.0)
    dl = (d[:, None] * sc)[..., None]
    q = _nint(x.reshape(n, 16, 16) / torch.where(dl != 0, dl, 1.0)).clamp(-32, 31) + 32
    q = torch.where(dl != 0, q, 32.0)
    return {"d": d, "sc": sc, "q": q.reshape(n, QK_K)}


_QUANTIZERS: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
    "q4_0": lambda x: _q_sym(x, 8.0, 8.5, 15),
    "q4_1": lambda x: _q_affine(x, 15),
    "q5_0": lambda x: _q_sym(x, 16.0, 16.5, 31),
    "q5_1": lambda x: _q_affine(x, 31),
    "q8_0": _q8_0,
    "iq4_nl": _iq4_nl,
    "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k,
}


def _dq_k(f: dict[str, Tensor], nsub: int, offset: float, affine: bool) -> Tensor:
    n = f["q"].shape[0]
    dl = (f["d"][:, None] * f["sc"])[..., None]
    q = f["q"].reshape(n, nsub, -1) - offset
    if affine:
        return (dl * q - (f["dmin"][:, None] * f["mn"])[..., None]).reshape(n, QK_K)
    return (dl * q).reshape(n, QK_K)


_DEQUANTIZERS: dict[str, Callable[[dict[str, Tensor]], Tensor]] = {
    "q4_0": lambda f: f["d"][:, None] * (f["q"] - 8),
    "q4_1": lambda f: f["d"][:, None] * f["q"] + f["m"][:, None],
    "q5_0": lambda f: f["d"][:, None] * (f["q"] - 16),
    "q5_1": lambda f: f["d"][:, None] * f["q"] + f["m"][:, None],
    "q8_0": lambda f: f["q"] * f["d"][:, None],
    "iq4_nl": lambda f: f["d"][:, None] * _IQ4[f["q"].long()],
    "q2_k": lambda f: _dq_k(f, 16, 0.0, True),
    "q3_k": lambda f: _dq_k(f, 16, 4.0, False),
    "q4_k": lambda f: _dq_k(f, 8, 0.0, True),
    "q5_k": lambda f: _dq_k(f, 8, 0.0, True),
    "q6_k": lambda f: _dq_k(f, 16, 32.0, False),
}


def _blocks(x: Tensor, fmt: BlockFormat) -> Tensor:
    """(n_blocks, block) float32 view of a weight whose rows are dim 1 (flattened past it)."""
    if x.dim() < 2:
        raise SmpqError(f"{fmt.name} needs a weight with rows (at least 2-D), got shape "
                        f"{tuple(x.shape)}")
    row = x[0].numel()
    if not available(fmt.name, row):
        raise SmpqError(f"{fmt.name} stores rows in blocks of {fmt.block}; a row of length "
                        f"{row} does not divide (shape {tuple(x.shape)})")
    return x.detach().to(torch.float32).reshape(-1, fmt.block)


@torch.no_grad()
def quantize_blocks(x: Tensor, fmt: str) -> dict[str, Tensor]:
    """The fields llama.cpp stores for `x` in format `fmt` (`FIELDS`), as float32 tensors."""
    bf = block_format(fmt)
    return _QUANTIZERS[fmt](_blocks(x, bf))


@torch.no_grad()
def dequantize_blocks(fields: dict[str, Tensor], fmt: str) -> Tensor:
    """(n_blocks, block) float32 values of stored fields (`gguf.quants`' order of operations)."""
    block_format(fmt)
    return _DEQUANTIZERS[fmt](fields)


@torch.no_grad()
def fake_quantize_blocks(x: Tensor, fmt: str) -> Tensor:
    """What llama.cpp would give back for `x` stored as `fmt`: same shape, dtype, device."""
    return dequantize_blocks(quantize_blocks(x, fmt), fmt).reshape(x.shape).to(x.dtype)
