"""Minifloat rounding against torch's FP8 casts and a brute-force nearest-grid-point search."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smpq.primitives import choose_qparams, fake_quantize, minifloat_values, round_to_minifloat
from smpq.spec import FLOAT_FORMATS, QuantSpec

TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _decode(code: int, exp_bits: int, man_bits: int, bias: int) -> float:
    """Value of one unsigned bit pattern (exponent field, mantissa field), IEEE-style."""
    e, m = code >> man_bits, code & ((1 << man_bits) - 1)
    if e == 0:
        return m * 2.0 ** (1 - bias - man_bits)
    return (2**man_bits + m) * 2.0 ** (e - bias - man_bits)


def _positive_grid(name: str) -> torch.Tensor:
    """Non-negative values in code order (code order == value order, so index parity is the
    mantissa parity), truncated at max_value."""
    f = FLOAT_FORMATS[name]
    vals = [_decode(c, f.exp_bits, f.man_bits, f.bias) for c in range(2 ** (f.bits - 1))]
    return torch.tensor([v for v in vals if v <= f.max_value], dtype=torch.float64)


def _brute_force(x: torch.Tensor, name: str) -> torch.Tensor:
    """Nearest grid value, ties to the even code, saturating; the oracle for rounding."""
    grid = _positive_grid(name)
    a = x.double().abs().clamp(max=float(grid[-1]))
    d = (a[:, None] - grid[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    even = (torch.arange(len(grid)) % 2 == 0)[None, :]
    tie_even = cand & even
    idx = torch.where(tie_even.any(dim=1), tie_even.float().argmax(1), cand.float().argmax(1))
    return torch.copysign(grid[idx], x.double())


def _test_points(name: str, n: int, seed: int) -> torch.Tensor:
    """Random values across every binade and the subnormals, plus all grid points and midpoints."""
    f = FLOAT_FORMATS[name]
    gen = torch.Generator().manual_seed(seed)
    lo_exp, hi_exp = f.min_normal_exp - f.man_bits - 2, torch.log2(torch.tensor(f.max_value))
    e = torch.rand(n, generator=gen, dtype=torch.float64) * (hi_exp - lo_exp) + lo_exp
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    grid = _positive_grid(name)
    mids = (grid[1:] + grid[:-1]) / 2
    pts = torch.cat([sign * torch.exp2(e), grid, -grid, mids, -mids])
    return pts.float().double()  # exactly representable in float32


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_values_match_torch_bit_patterns(name):
    codes = torch.arange(256, dtype=torch.uint8).view(TORCH_FP8[name]).double()
    ref = torch.unique(codes[torch.isfinite(codes)])
    assert torch.equal(minifloat_values(FLOAT_FORMATS[name]), ref)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_rounding_matches_torch_cast(name):
    f = FLOAT_FORMATS[name]
    x = _test_points(name, 20000, 1).float()
    x = x[x.abs() <= f.max_value]
    ref = x.to(TORCH_FP8[name]).float()
    assert torch.equal(round_to_minifloat(x, f), ref)
    assert torch.equal(round_to_minifloat(x.double(), f), ref.double())
    half = x.half()  # float16 inputs (including its subnormals) round the same way
    assert torch.equal(round_to_minifloat(half, f), half.float().to(TORCH_FP8[name]).half())


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_saturation_and_nan(name):
    f = FLOAT_FORMATS[name]
    x = torch.tensor([f.max_value * 1.01, f.max_value * 100, float("inf"), -float("inf"), 1e30])
    out = round_to_minifloat(x, f)
    assert torch.equal(out, torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0]) * f.max_value)
    assert torch.isnan(round_to_minifloat(torch.tensor([float("nan")]), f)).all()
    assert round_to_minifloat(torch.tensor([0.0]), f).item() == 0.0


def test_fp4_e2m1_hand_enumeration():
    vals = minifloat_values(FLOAT_FORMATS["fp4_e2m1"])
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert vals.tolist() == sorted({*pos, *(-v for v in pos)})


def test_fp6_hand_enumeration():
    e2m3 = [m / 8 for m in range(8)] + [(1 + m / 8) * 2.0**e for e in range(3) for m in range(8)]
    e3m2 = [m / 4 * 2.0**-2 for m in range(4)]
    e3m2 += [(1 + m / 4) * 2.0**e for e in range(-2, 5) for m in range(4)]
    for name, pos in (("fp6_e2m3", e2m3), ("fp6_e3m2", e3m2)):
        vals = minifloat_values(FLOAT_FORMATS[name])
        assert vals.tolist() == sorted({*pos, *(-v for v in pos)})
        assert len(vals) == 63
        assert vals.max().item() == FLOAT_FORMATS[name].max_value


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_value_counts_from_bit_patterns(name):
    pos = _positive_grid(name)
    assert len(minifloat_values(FLOAT_FORMATS[name])) == 2 * len(pos) - 1
    expected = {"fp8_e4m3": 253, "fp8_e5m2": 247, "fp6_e3m2": 63, "fp6_e2m3": 63, "fp4_e2m1": 15}
    assert len(minifloat_values(FLOAT_FORMATS[name])) == expected[name]


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_rounding_matches_brute_force(name):
    f = FLOAT_FORMATS[name]
    x = torch.cat([_test_points(name, 5000, 2), torch.tensor([f.max_value * 3, -1e9])])
    assert torch.equal(round_to_minifloat(x, f), _brute_force(x, name))


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(list(FLOAT_FORMATS)),
    vals=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=50),
)
def test_rounding_brute_force_property(name, vals):
    x = torch.tensor(vals, dtype=torch.float32)
    assert torch.equal(round_to_minifloat(x, FLOAT_FORMATS[name]).double(), _brute_force(x, name))


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_fake_quantize_minifloat_lands_on_scaled_grid(name, gran):
    f = FLOAT_FORMATS[name]
    spec = QuantSpec(bits=f.bits, fmt=name, granularity=gran)
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 5
    scale, _ = choose_qparams(x, spec)
    amax = x.abs().amax(dim=1) if gran == "channel" else x.abs().max()
    assert torch.allclose(scale.reshape(-1) * f.max_value, amax.reshape(-1))
    out = fake_quantize(x, spec, scale)
    assert torch.equal(out, round_to_minifloat(x / scale, f) * scale)
    assert torch.equal(fake_quantize(out, spec, scale), out)  # idempotent
    grid = minifloat_values(f)
    units = (out.double() / scale.double()).reshape(-1)  # r * s / s: exact up to an ulp
    nearest = (units[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.all(nearest <= 1e-6 * units.abs())
    y = x.clone().requires_grad_(True)
    fake_quantize(y, spec).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))
