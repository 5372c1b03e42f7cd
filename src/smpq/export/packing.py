"""Storage codes for quantized weights: bit packing, minifloat bit patterns, `QuantizedTensor`.

Storage codes are unsigned, `bits` wide, one per weight element:

| format                 | storage code u of integer code q / value   | value of u           |
|------------------------|--------------------------------------------|----------------------|
| int, 1 bit (sign)      | 1 for +scale, 0 for -scale                 | (2u - 1) * s         |
| int, symmetric, b >= 2 | q + 2^(b-1) (offset binary, as GPTQ)       | (u - 2^(b-1)) * s    |
| int, asymmetric        | q (already in [0, 2^b - 1])                | (u - zero_point) * s |
| minifloat              | the format's sign/exponent/mantissa bits   | decoded(u) * s       |

Packing is an LSB-first bit stream along the last dimension: code k of a row occupies bits
k*b .. k*b+b-1, bit p being bit (p % 8) of byte p // 8. Each row is padded with zero bits to a
whole byte, so rows stay independently addressable. fp8 patterns equal torch's
float8_e4m3fn / float8_e5m2 bit patterns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from smpq.errors import SmpqError
from smpq.primitives import (
    choose_qparams,
    dequantize,
    group_counts,
    group_view,
    minifloat_values,
    quantize,
    round_to_minifloat,
    ungroup_view,
)
from smpq.spec import FLOAT_FORMATS, MinifloatFormat, QuantSpec

__all__ = [
    "QuantizedTensor",
    "decode_minifloat",
    "encode_minifloat",
    "minifloat_codebook",
    "pack",
    "packed_length",
    "unpack",
]


# -- bit packing ----------------------------------------------------------------------------


def packed_length(numel: int, bits: int) -> int:
    """Bytes needed for `numel` codes of `bits` bits (one row, padded to a whole byte)."""
    return -(-numel * bits // 8)


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    pad = -x.shape[-1] % multiple
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)


def _pack_bytes(codes: Tensor, bits: int) -> Tensor:
    return codes.to(torch.uint8)


def _unpack_bytes(packed: Tensor, bits: int, numel: int) -> Tensor:
    return packed.clone()


def _pack_aligned(codes: Tensor, bits: int) -> Tensor:
    """1, 2, 4 bits: 8 // bits whole codes per byte, the first in the low bits."""
    per = 8 // bits
    c = _pad_last(codes, per).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_aligned(packed: Tensor, bits: int, numel: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    c = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :numel].to(torch.uint8)


def _pack_straddled(codes: Tensor, bits: int) -> Tensor:
    """3, 5, 6, 7 bits: codes cross byte borders; 8 codes make exactly `bits` bytes."""
    c = _pad_last(codes, 8).reshape(*codes.shape[:-1], -1, 8)
    word = (c << (torch.arange(8, dtype=torch.int64) * bits)).sum(dim=-1)  # < 2^56
    out = (word.unsqueeze(-1) >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def _unpack_straddled(packed: Tensor, bits: int, numel: int) -> Tensor:
    b = _pad_last(packed.to(torch.int64), bits).reshape(*packed.shape[:-1], -1, bits)
    word = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=-1)
    c = (word.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * bits)) & (2**bits - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :numel].to(torch.uint8)


Packer = Callable[[Tensor, int], Tensor]
Unpacker = Callable[[Tensor, int, int], Tensor]

_PACKERS: dict[int, tuple[Packer, Unpacker]] = {
    1: (_pack_aligned, _unpack_aligned),
    2: (_pack_aligned, _unpack_aligned),
    3: (_pack_straddled, _unpack_straddled),
    4: (_pack_aligned, _unpack_aligned),
    5: (_pack_straddled, _unpack_straddled),
    6: (_pack_straddled, _unpack_straddled),
    7: (_pack_straddled, _unpack_straddled),
    8: (_pack_bytes, _unpack_bytes),
}


def _check_bits(bits: int) -> None:
    if bits not in _PACKERS:
        raise SmpqError(f"can pack 1 to 8 bits per code, got {bits!r}")


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 bytes of unsigned `codes` (..., n) -> (..., packed_length(n, bits)), per row."""
    _check_bits(bits)
    if codes.dim() < 1 or codes.is_floating_point() or codes.is_complex():
        raise SmpqError("pack needs an integer tensor with at least one dimension")
    c = codes.detach().cpu().to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise SmpqError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    out = _PACKERS[bits][0](c, bits)
    return out[..., : packed_length(codes.shape[-1], bits)].contiguous()


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack`: uint8 codes (..., numel) from packed rows."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() < 1:
        raise SmpqError(f"packed codes must be a uint8 tensor, got {packed.dtype}")
    if packed.shape[-1] != packed_length(numel, bits):
        raise SmpqError(
            f"{numel} codes of {bits} bits take {packed_length(numel, bits)} bytes per row, "
            f"got {packed.shape[-1]}"
        )
    return _PACKERS[bits][1](packed.cpu(), bits, numel)


# -- minifloat bit patterns -----------------------------------------------------------------


def _pattern_value(p: int, fmt: MinifloatFormat) -> float:
    sign = -1.0 if p >> (fmt.bits - 1) else 1.0
    e = (p >> fmt.man_bits) & (2**fmt.exp_bits - 1)
    frac = (p & (2**fmt.man_bits - 1)) / 2**fmt.man_bits
    mag = frac * 2.0 ** (1 - fmt.bias) if e == 0 else (1.0 + frac) * 2.0 ** (e - fmt.bias)
    return sign * mag if mag <= fmt.max_value else math.nan  # above max: inf/NaN encodings


@functools.cache
def _decode_table(name: str) -> Tensor:
    fmt = FLOAT_FORMATS[name]
    return torch.tensor([_pattern_value(p, fmt) for p in range(2**fmt.bits)], dtype=torch.float64)


@functools.cache
def minifloat_codebook(name: str) -> tuple[Tensor, Tensor]:
    """(finite values sorted as `minifloat_values`, their bit patterns as uint8).

    Built by decoding every pattern; 0 gets the +0 pattern. Raises if the decoded set differs
    from `minifloat_values` (the two enumerations must describe the same format).
    """
    if name not in FLOAT_FORMATS:
        raise SmpqError(f"unknown minifloat format {name!r}; known: {', '.join(FLOAT_FORMATS)}")
    table = _decode_table(name).tolist()
    first: dict[float, int] = {}
    for p, v in enumerate(table):
        if not math.isnan(v):
            first.setdefault(v + 0.0, p)  # +0.0 folds -0.0 into 0.0 (pattern 0 comes first)
    values = minifloat_values(FLOAT_FORMATS[name])
    if sorted(first) != values.tolist():
        raise SmpqError(f"bit patterns of {name} disagree with minifloat_values")
    codes = torch.tensor([first[v] for v in values.tolist()], dtype=torch.uint8)
    return values, codes


def encode_minifloat(values: Tensor, name: str) -> Tensor:
    """Bit patterns (uint8) of values that lie exactly on the format's grid."""
    grid, codes = minifloat_codebook(name)
    v = values.detach().cpu().to(torch.float64).reshape(-1)
    idx = torch.searchsorted(grid, v).clamp(max=grid.numel() - 1)
    if not bool((grid[idx] == v).all()):
        raise SmpqError(f"values are not representable in {name} (off the grid, or NaN/inf)")
    return codes[idx].reshape(values.shape)


def decode_minifloat(codes: Tensor, name: str) -> Tensor:
    """float32 values of bit patterns (inf/NaN patterns decode to NaN)."""
    return _decode_table(name).to(codes.device, torch.float32)[codes.to(torch.int64)]


# -- storage codes of integer formats --------------------------------------------------------

IntCodec = tuple[Callable[[Tensor, int], Tensor], Callable[[Tensor, int], Tensor]]

_INT_CODECS: dict[str, IntCodec] = {
    "sign": (lambda q, b: (q > 0).to(torch.uint8), lambda u, b: 2 * u - 1),
    "sym": (lambda q, b: (q + 2 ** (b - 1)).to(torch.uint8), lambda u, b: u - 2 ** (b - 1)),
    "asym": (lambda q, b: q.to(torch.uint8), lambda u, b: u),
}


def _int_kind(spec: QuantSpec) -> str:
    if spec.bits == 1:
        return "sign"
    return "sym" if spec.symmetric else "asym"


def _encode(w: Tensor, spec: QuantSpec, scale: Tensor, zp: Tensor | None) -> Tensor:
    """Storage codes (uint8, shaped like w) of w on the grid of the given scales."""
    if spec.is_float:
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        g = group_view(w.detach().to(dt), spec)
        v = round_to_minifloat(g / scale.to(g.dtype), spec.minifloat)
        return encode_minifloat(ungroup_view(v, w.shape, spec), spec.fmt)
    q = quantize(w, spec, scale, zp).to(torch.int64)
    return _INT_CODECS[_int_kind(spec)][0](q, spec.bits)


def _rows(shape: torch.Size, spec: QuantSpec) -> int:
    return group_counts(shape, spec).shape[0]


# -- the exchange type ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized weight as codes plus scales: what RTN / GPTQ hand to the exporters.

    codes: uint8 storage codes shaped `shape` (table in the module docstring).
    scale: float32 (or float64) of shape (rows, 1), rows of `primitives.group_view`
    (out-channel major, group minor); any shape with that many elements is accepted.
    zero_point: like scale, integer-valued, asymmetric integer formats only.
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None
    spec: QuantSpec
    shape: torch.Size

    def __post_init__(self) -> None:
        shape = torch.Size(self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) < 1:
            raise SmpqError("a quantized tensor needs at least one dimension")
        if self.codes.dtype != torch.uint8 or self.codes.shape != shape:
            raise SmpqError(f"codes must be uint8 of shape {tuple(shape)}")
        rows = _rows(shape, self.spec)
        if self.scale.numel() != rows:
            got = self.scale.numel()
            raise SmpqError(f"expected {rows} scales for {self.spec.label}, got {got}")
        object.__setattr__(self, "scale", self.scale.detach().reshape(rows, 1))
        wants_zp = self.spec.fmt == "int" and not self.spec.symmetric
        if wants_zp != (self.zero_point is not None):
            raise SmpqError(f"{self.spec.label}: zero points are required iff asymmetric")
        if self.zero_point is not None:
            zp = self.zero_point.detach().reshape(-1)
            if zp.numel() != rows:
                raise SmpqError(f"expected {rows} zero points, got {zp.numel()}")
            ok = (zp == zp.long().to(zp.dtype)) & (zp >= 0) & (zp <= 2**self.spec.bits - 1)
            if not bool(ok.all()):
                raise SmpqError(f"zero points must be integers in [0, {2**self.spec.bits - 1}]")
            object.__setattr__(self, "zero_point", zp.reshape(rows, 1))

    @classmethod
    def from_float(cls, w: Tensor, spec: QuantSpec) -> QuantizedTensor:
        """Round-to-nearest with min/max scales (`choose_qparams`), as `rtn_quantize_weight`."""
        scale, zp = choose_qparams(w, spec)
        return cls(_encode(w, spec, scale, zp), scale, zp, spec, w.shape)

    @classmethod
    def from_fake(
        cls, w_fq: Tensor, spec: QuantSpec, scale: Tensor, zero_point: Tensor | None = None
    ) -> QuantizedTensor:
        """Recover the codes of an already fake-quantized weight (RTN, GPTQ, AWQ) exactly.

        `scale` / `zero_point` are the ones it was quantized with (e.g. `GPTQResult.scale`,
        shaped (out, n_groups)). Raises if `dequantize()` would not give back `w_fq` exactly,
        e.g. GPTQ act-order with dynamic groups, whose groups are not contiguous.
        """
        rows = _rows(w_fq.shape, spec)
        if scale.numel() != rows:
            raise SmpqError(f"expected {rows} scales for {spec.label}, got {scale.numel()}")
        scale = scale.detach().reshape(rows, 1)
        zp = None if zero_point is None else zero_point.detach().reshape(rows, 1)
        qt = cls(_encode(w_fq, spec, scale, zp), scale, zp, spec, w_fq.shape)
        back = qt.dequantize(w_fq.dtype).to(w_fq.device)
        if not torch.equal(back, w_fq.detach()):
            err = (back.double() - w_fq.detach().double()).abs().max().item()
            raise SmpqError(
                f"weights are not on the {spec.label} grid of the given scales (max error "
                f"{err:.3g}); pass the scales they were quantized with"
            )
        return qt

    def int_codes(self) -> Tensor:
        """Signed integer codes as `primitives.quantize` returns them (integer formats)."""
        if self.spec.is_float:
            raise SmpqError(f"integer codes exist only for fmt='int', not {self.spec.fmt}")
        return _INT_CODECS[_int_kind(self.spec)][1](self.codes.to(torch.int64), self.spec.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The fake-quantized weight: bit-identical to `fake_quantize` with these scales."""
        if self.spec.is_float:
            dt = torch.float64 if self.scale.dtype == torch.float64 else torch.float32
            g = group_view(decode_minifloat(self.codes, self.spec.fmt).to(dt), self.spec)
            out = ungroup_view(g * self.scale.to(dt), self.shape, self.spec)
        else:
            out = dequantize(self.int_codes(), self.spec, self.scale, self.zero_point)
        return out.to(dtype)
