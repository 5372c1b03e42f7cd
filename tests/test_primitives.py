"""Properties of the integer fake quantizer, checked against hand values and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smpq.errors import SmpqError
from smpq.primitives import (
    LSQWeightQuantizer,
    choose_qparams,
    dequantize,
    fake_quantize,
    group_counts,
    group_view,
    int_range,
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_init_step,
    quantize,
    ungroup_view,
)
from smpq.spec import Granularity, QuantSpec

FAST = settings(max_examples=40, deadline=None)


@st.composite
def specs(draw, fmt: str = "int") -> QuantSpec:
    bits = draw(st.integers(1, 8))
    symmetric = bits == 1 or draw(st.booleans())
    gran = draw(st.sampled_from(list(Granularity)))
    gs = draw(st.integers(1, 12)) if gran is Granularity.GROUP else None
    return QuantSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=gs)


@st.composite
def weights(draw) -> torch.Tensor:
    shape = draw(st.sampled_from([(3, 7), (4, 5, 3), (2, 3, 2, 2), (1, 11), (5, 1)]))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * mag


def _row_scale(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    """The scale of every element of x (broadcast back from the grouped view)."""
    g = torch.broadcast_to(scale, group_view(x, spec).shape)
    return ungroup_view(g, x.shape, spec)


def test_int_range_hand_values():
    assert int_range(1, True) == (-1, 1)
    assert int_range(2, True) == (-2, 1)
    assert int_range(4, True) == (-8, 7)
    assert int_range(8, True) == (-128, 127)
    assert int_range(4, False) == (0, 15)
    assert int_range(8, False) == (0, 255)
    with pytest.raises(SmpqError):
        int_range(1, False)


@FAST
@given(spec=specs(), x=weights())
def test_idempotent_with_same_qparams(spec, x):
    scale, zp = choose_qparams(x, spec)
    once = fake_quantize(x, spec, scale, zp)
    assert torch.equal(fake_quantize(once, spec, scale, zp), once)


@FAST
@given(spec=specs(), x=weights())
def test_error_at_most_half_step_inside_range(spec, x):
    scale, zp = choose_qparams(x, spec)
    out = fake_quantize(x, spec, scale, zp)
    s = _row_scale(x, spec, scale)
    if spec.bits == 1:  # sign x scale: the values are exactly ±scale
        assert torch.equal(out.abs(), s)
        assert torch.equal(out >= 0, x >= 0)
        return
    # min/max scales put every element inside its range
    assert torch.all((out - x).abs() <= s / 2 * (1 + 1e-5) + 1e-30)


@FAST
@given(spec=specs(), seed=st.integers(0, 2**31 - 1))
def test_monotone_per_tensor(spec, seed):
    spec = QuantSpec(bits=spec.bits, symmetric=spec.symmetric)
    x = torch.sort(torch.randn(200, generator=torch.Generator().manual_seed(seed)) * 3).values
    scale, zp = choose_qparams(x, spec)
    out = fake_quantize(x * 1.5, spec, scale, zp)  # also monotone across the clipping points
    assert torch.all(out[1:] >= out[:-1])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_points_exact_and_clipping(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    qmin, qmax = int_range(bits, symmetric)
    scale = torch.tensor(0.037)
    zp = None if symmetric else torch.tensor(float(-qmin + (qmax - qmin) // 3))
    off = 0.0 if zp is None else float(zp)
    grid = (torch.arange(qmin, qmax + 1, dtype=torch.float32) - off) * scale
    assert torch.equal(fake_quantize(grid, spec, scale, zp), grid)
    far = torch.tensor([grid[0] - 10.0, grid[-1] + 10.0, -1e6, 1e6])
    assert torch.equal(
        fake_quantize(far, spec, scale, zp), torch.stack([grid[0], grid[-1], grid[0], grid[-1]])
    )


def test_rounding_ties_to_even():
    spec = QuantSpec(bits=8)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5])
    expected = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 126.0, -128.0])
    assert torch.equal(fake_quantize(x, spec, torch.tensor(1.0)), expected)
    q = quantize(x, QuantSpec(bits=8, symmetric=False), torch.tensor(1.0), torch.tensor(128.0))
    assert q.tolist() == [128, 130, 130, 128, 126, 126, 254, 0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_numpy_reference_per_channel(bits):
    """Independent float32 numpy implementation of symmetric / asymmetric per-row quantization."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((6, 40)).astype(np.float32) * 0.7
    for symmetric in {True, bits == 1}:
        spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel")
        got = fake_quantize(torch.from_numpy(w), spec).numpy()
        if bits == 1:
            s = np.abs(w).mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
            ref = np.where(w >= 0, s, -s)
        elif symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = np.abs(w).max(axis=1, keepdims=True) / np.float32(qmax)
            ref = np.clip(np.round(w / s), -qmax - 1, qmax) * s
        else:
            qmax = 2**bits - 1
            lo = np.minimum(w.min(axis=1, keepdims=True), 0)
            hi = np.maximum(w.max(axis=1, keepdims=True), 0)
            s = (hi - lo) / np.float32(qmax)
            zp = np.clip(np.round(-lo / s), 0, qmax)
            ref = (np.clip(np.round(w / s) + zp, 0, qmax) - zp) * s
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (17,), (4, 6), (3, 2, 5, 5)])
def test_dtype_device_shape_preserved(dtype, shape):
    x = torch.randn(shape).to(dtype)
    for spec in (
        QuantSpec(bits=4),
        QuantSpec(bits=8, fmt="fp8_e4m3"),
        QuantSpec(bits=3, symmetric=False),
    ):
        out = fake_quantize(x, spec)
        assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    if len(shape) >= 1:
        for spec in (
            QuantSpec(bits=4, granularity="channel"),
            QuantSpec(bits=2, granularity="group", group_size=4),
        ):
            out = fake_quantize(x, spec)
            assert out.dtype == dtype and out.shape == x.shape


@FAST
@given(x=weights(), bits=st.integers(2, 8), gran=st.sampled_from(list(Granularity)))
def test_asymmetric_zero_is_exact(x, bits, gran):
    gs = 4 if gran is Granularity.GROUP else None
    spec = QuantSpec(bits=bits, symmetric=False, granularity=gran, group_size=gs)
    x = x.clone()
    x.view(-1)[::3] = 0.0
    out = fake_quantize(x, spec)
    assert torch.all(out[x == 0] == 0)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=1),
        QuantSpec(bits=4),
        QuantSpec(bits=8, symmetric=False),
        QuantSpec(bits=3, granularity="channel"),
        QuantSpec(bits=2, granularity="group", group_size=3),
        QuantSpec(bits=8, fmt="fp8_e5m2", granularity="channel"),
        QuantSpec(bits=4, fmt="fp4_e2m1", granularity="group", group_size=5),
    ],
)
def test_all_zero_tensor_gives_no_nan(spec):
    x = torch.zeros(3, 7)
    scale, zp = choose_qparams(x, spec)
    assert torch.all(scale > 0)
    out = fake_quantize(x, spec)
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e-30
    if spec.fmt == "int":
        assert torch.isfinite(dequantize(quantize(x, spec, scale, zp), spec, scale, zp)).all()


@FAST
@given(spec=specs(), x=weights())
def test_quantize_dequantize_round_trip_exact(spec, x):
    scale, zp = choose_qparams(x, spec)
    q = quantize(x, spec, scale, zp)
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    assert q.dtype in (torch.int8, torch.int16) and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if spec.bits == 1:
        assert set(q.unique().tolist()) <= {-1, 1}
    assert torch.equal(dequantize(q, spec, scale, zp), fake_quantize(x, spec, scale, zp))


def test_quantize_rejects_minifloat():
    spec = QuantSpec(bits=8, fmt="fp8_e4m3")
    with pytest.raises(SmpqError):
        quantize(torch.randn(4), spec, torch.tensor(1.0))


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [1, 4, 7, 32])
def test_group_padding_matches_per_chunk_reference(bits, symmetric, group_size):
    """Groups along the flattened input dim equal quantizing each chunk as its own tensor."""
    if bits == 1 and not symmetric:
        return
    w = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(group_size)) + 0.3
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)
    per_tensor = QuantSpec(bits=bits, symmetric=symmetric)
    got = fake_quantize(w, spec).reshape(3, 15)
    for r, row in enumerate(w.reshape(3, 15)):
        for start in range(0, 15, group_size):
            chunk = row[start : start + group_size]
            ref = fake_quantize(chunk, per_tensor)
            # 1-bit scales are means: summation order may differ by an ulp
            tol = {"rtol": 1e-6, "atol": 0.0} if bits == 1 else {"rtol": 0.0, "atol": 0.0}
            torch.testing.assert_close(got[r, start : start + group_size], ref, **tol)
    n_groups = math.ceil(15 / group_size)
    assert choose_qparams(w, spec)[0].shape == (3 * n_groups, 1)
    assert int(group_counts(w.shape, spec).sum()) == w.numel()


def test_group_view_round_trip_and_channel_shapes():
    w = torch.randn(4, 3, 3, 3)
    for spec in (
        QuantSpec(bits=4),
        QuantSpec(bits=4, granularity="channel"),
        QuantSpec(bits=4, granularity="group", group_size=10),
    ):
        assert torch.equal(ungroup_view(group_view(w, spec), w.shape, spec), w)
    assert group_view(w, QuantSpec(bits=4, granularity="channel")).shape == (4, 27)
    assert group_view(w, QuantSpec(bits=4, granularity="group", group_size=10)).shape == (12, 10)
    with pytest.raises(SmpqError):
        fake_quantize(torch.tensor(1.0), QuantSpec(bits=4, granularity="channel"))


@pytest.mark.parametrize("bits,symmetric", [(1, True), (2, True), (4, True), (4, False)])
def test_ste_gradient_is_one_inside_zero_outside(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    qmin, qmax = int_range(bits, symmetric)
    scale = torch.tensor(0.25)
    zp = None if symmetric else torch.tensor(3.0)
    off = 0.0 if zp is None else 3.0
    lo, hi = (qmin - off) * 0.25, (qmax - off) * 0.25
    inside = torch.linspace(lo, hi, 9)
    outside = torch.tensor([lo - 1.0, hi + 1.0])
    x = torch.cat([inside, outside]).requires_grad_(True)
    (fake_quantize(x, spec, scale, zp) * 2.0).sum().backward()
    assert torch.equal(x.grad, torch.tensor([2.0] * 9 + [0.0, 0.0]))


def test_ste_with_own_qparams_passes_everything():
    """With min/max qparams nothing is clipped, so the gradient is all ones."""
    x = torch.randn(5, 9, requires_grad=True)
    fake_quantize(x, QuantSpec(bits=3, granularity="channel")).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_lsq_step_gradient_hand_example():
    """LSQ paper, eq. 3: dv^/ds = -v/s + round(v/s) inside, qmin / qmax when clipped."""
    x = torch.tensor([0.3, -1.2, 2.9, 0.05, -3.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    qmin, qmax = -4, 3
    g = 1.0 / math.sqrt(5 * 3)
    out = lsq_fake_quantize(x, step, qmin, qmax, g)
    # v = [0.6, -2.4, 5.8, 0.1, -6.0] -> codes [1, -2, 3 (clip), 0, -4 (clip)]
    assert torch.allclose(out, torch.tensor([0.5, -1.0, 1.5, 0.0, -2.0]))
    out.sum().backward()
    # inside: (1 - 0.6) + (-2 + 2.4) + (0 - 0.1); clipped: 3 + (-4)
    expected = (0.4 + 0.4 - 0.1 + 3.0 - 4.0) * g
    assert step.grad.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]))
    assert g == pytest.approx(lsq_grad_scale(5, 3))


def test_lsq_per_channel_step_and_zero_point():
    x = torch.tensor([[0.3, 0.9], [1.0, -0.2]], requires_grad=True)
    step = torch.tensor([[0.5], [0.25]], requires_grad=True)
    zp = torch.tensor([[1.0], [2.0]])
    out = lsq_fake_quantize(x, step, 0, 3, 1.0, zero_point=zp)
    # row 0: round(v=[0.6, 1.8]) + 1 -> codes [2, 3], both inside -> (c - 1) * 0.5
    # row 1: round(v=[4, -0.8]) + 2 -> codes [3 (clipped from 6), 1] -> (c - 2) * 0.25
    assert torch.allclose(out, torch.tensor([[0.5, 1.0], [0.25, -0.25]]))
    out.sum().backward()
    expected = torch.tensor([[(1 - 0.6) + (2 - 1.8)], [(3 - 2) + (-1 + 0.8)]])
    assert torch.allclose(step.grad, expected)
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_lsq_init_step():
    x = torch.tensor([1.0, -3.0, 2.0, 0.0])
    assert lsq_init_step(x, 7).item() == pytest.approx(2 * 1.5 / math.sqrt(7))


def test_lsq_weight_quantizer():
    w = torch.randn(4, 6, 3, requires_grad=True)
    spec = QuantSpec(bits=4, granularity="group", group_size=5)
    lsq = LSQWeightQuantizer(spec)
    lsq.init_from(w)
    rows = w.detach().reshape(4, 18)
    first_group = rows[:, :5].abs().mean(dim=1)
    assert lsq.step.shape == (16, 1)
    assert torch.allclose(lsq.step.detach()[::4, 0], 2 * first_group / math.sqrt(7))
    out = lsq(w)
    assert out.shape == w.shape
    out.pow(2).sum().backward()
    assert lsq.step.grad is not None and torch.isfinite(lsq.step.grad).all()
    assert lsq.step.grad.abs().sum() > 0 and w.grad is not None
    fresh = LSQWeightQuantizer(spec)
    fresh.load_state_dict(lsq.state_dict())
    assert torch.equal(fresh(w), out)
    with pytest.raises(SmpqError):
        LSQWeightQuantizer(QuantSpec(bits=8, fmt="fp8_e4m3"))


def test_lsq_weight_quantizer_one_bit_and_lazy_init():
    w = torch.randn(3, 8)
    lsq = LSQWeightQuantizer(QuantSpec(bits=1, granularity="channel"))
    out = lsq(w)  # initialises itself from the first weight
    assert torch.allclose(out.abs(), w.abs().mean(dim=1, keepdim=True).expand_as(w))
    assert torch.equal(out > 0, w >= 0)


@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_sqnr_floor_8bit_gaussian(gran):
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    out = fake_quantize(x, QuantSpec(bits=8, granularity=gran))
    sqnr = 10 * math.log10(float(x.pow(2).sum() / (out - x).pow(2).sum()))
    assert sqnr > 35.0
