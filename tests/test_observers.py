"""Activation range calibration and the ActQuantizer module."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smpq.errors import SmpqError
from smpq.observers import ActQuantizer, range_minmax, range_mse, range_percentile
from smpq.primitives import fake_quantize, qparams_from_range
from smpq.spec import FLOAT_FORMATS, QuantSpec


def _mse(x: torch.Tensor, spec: QuantSpec, lo: float, hi: float) -> float:
    scale, zp = qparams_from_range(lo, hi, spec)
    return float(((fake_quantize(x, spec, scale, zp) - x) ** 2).mean())


def _heavy_tailed(n: int = 20000, seed: int = 0) -> torch.Tensor:
    gen = np.random.default_rng(seed)
    return torch.from_numpy(gen.standard_t(df=4, size=n).astype(np.float32))


def test_range_minmax_known():
    x = torch.tensor([[-2.0, 0.5], [3.0, 1.0]])
    assert range_minmax(x) == (-2.0, 3.0)
    assert range_minmax(x, symmetric=True) == (-3.0, 3.0)
    assert range_minmax(torch.tensor([1.0, float("nan"), float("inf"), 2.0])) == (1.0, 2.0)


def test_range_percentile_known():
    x = torch.arange(0, 10001, dtype=torch.float32)  # linear-interpolated percentiles are exact
    assert range_percentile(x, 99.0) == pytest.approx((100.0, 9900.0))
    assert range_percentile(x, 100.0) == (0.0, 10000.0)
    sym = torch.cat([-x, x])
    assert range_percentile(sym, 90.0, symmetric=True) == pytest.approx((-9000.0, 9000.0))
    with pytest.raises(SmpqError):
        range_percentile(x, 10.0)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, True), (4, False), (2, True)])
def test_range_mse_beats_minmax_on_heavy_tails(bits, symmetric):
    x = _heavy_tailed()
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    lo, hi = range_mse(x, spec)
    mm = range_minmax(x, symmetric=symmetric)
    assert _mse(x, spec, lo, hi) <= _mse(x, spec, *mm)
    assert _mse(x, spec, lo, hi) < 0.5 * _mse(x, spec, *mm)  # outliers make clipping pay off
    if symmetric:
        assert lo == -hi


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(["int", *FLOAT_FORMATS]))
def test_range_mse_never_worse_than_minmax(seed, fmt):
    bits = 4 if fmt == "int" else FLOAT_FORMATS[fmt].bits
    spec = QuantSpec(bits=bits, fmt=fmt)
    x = _heavy_tailed(2000, seed % 1000)
    assert _mse(x, spec, *range_mse(x, spec, n_grid=20)) <= _mse(x, spec, *range_minmax(x, True))


def test_calibrate_then_quantize_flow():
    spec = QuantSpec(bits=4, symmetric=False)
    aq = ActQuantizer(spec, method="minmax")
    aq.start_calibration()
    batches = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for b in batches:
        assert aq(b) is b  # calibration passes activations through untouched
    lo, hi = aq.finish_calibration()
    everything = torch.cat(batches)
    assert (lo, hi) == (float(everything.min()), float(everything.max()))
    assert not aq.calibrating and bool(aq.calibrated)
    scale, zp = float(aq.scale), float(aq.zero_point)
    assert scale == pytest.approx((hi - lo) / 15, rel=1e-6)
    out = aq(everything)
    codes = out / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 15 + 1e-3
    assert torch.all((out - everything).abs() <= scale / 2 + 1e-6)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_methods_give_symmetric_ranges_for_symmetric_specs(method):
    aq = ActQuantizer(QuantSpec(bits=4), method=method)
    aq.start_calibration()
    aq(_heavy_tailed(5000) + 1.0)
    lo, hi = aq.finish_calibration()
    assert lo == -hi and hi > 0


def test_minifloat_activation_scale():
    f = FLOAT_FORMATS["fp8_e4m3"]
    aq = ActQuantizer(QuantSpec(bits=8, fmt="fp8_e4m3"), method="minmax")
    aq.start_calibration()
    x = torch.tensor([-3.0, 0.5, 7.0])
    aq(x)
    aq.finish_calibration()
    assert float(aq.scale) == pytest.approx(7.0 / f.max_value)
    assert aq(x)[2].item() == pytest.approx(7.0)
    y = torch.randn(100)
    assert torch.equal(aq(y), (y / aq.scale).to(torch.float8_e4m3fn).float() * aq.scale)


def test_error_before_calibration_and_set_range():
    aq = ActQuantizer(QuantSpec(bits=8, symmetric=False))
    with pytest.raises(SmpqError, match="before calibration"):
        aq(torch.randn(3))
    aq.set_range(0.0, 2.55)
    out = aq(torch.tensor([0.0, 1.0, 3.0, -1.0]))
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 2.55, 0.0]))
    with pytest.raises(SmpqError):
        aq.set_range(2.0, 1.0)


def test_unknown_method_lists_known_and_bad_inputs():
    with pytest.raises(SmpqError, match="minmax.*percentile.*mse"):
        ActQuantizer(QuantSpec(bits=8), method="kl")
    with pytest.raises(SmpqError):
        ActQuantizer(QuantSpec(bits=8, granularity="channel"))
    aq = ActQuantizer(QuantSpec(bits=8))
    aq.start_calibration()
    with pytest.raises(SmpqError, match="without observing"):
        aq.finish_calibration()


@pytest.mark.parametrize("learnable", [False, True])
def test_state_dict_round_trip(learnable):
    spec = QuantSpec(bits=6, symmetric=False)
    aq = ActQuantizer(spec, method="percentile", learnable=learnable)
    aq.start_calibration()
    aq(torch.randn(1000).relu())
    aq.finish_calibration()
    x = torch.randn(50)
    ref = aq(x)
    fresh = ActQuantizer(spec, method="percentile", learnable=learnable)
    fresh.load_state_dict(aq.state_dict())
    assert bool(fresh.calibrated)
    assert set(aq.state_dict()) >= {"scale", "zero_point", "calibrated"}
    assert torch.equal(fresh(x), ref)
    assert torch.equal(pickle.loads(pickle.dumps(aq))(x), ref)


def test_reservoir_is_bounded_and_seeded():
    def calibrate(seed: int) -> tuple[ActQuantizer, tuple[float, float]]:
        aq = ActQuantizer(QuantSpec(bits=4), method="percentile", reservoir_size=500, seed=seed)
        aq.start_calibration()
        for i in range(6):
            aq(torch.randn(400, generator=torch.Generator().manual_seed(i)))
        assert aq._stats.values.numel() == 500 and aq._stats.seen == 2400
        copy.deepcopy(aq)  # a module mid-calibration can still be copied
        return aq, aq.finish_calibration()

    assert calibrate(0)[1] == calibrate(0)[1]
    assert calibrate(0)[1] != calibrate(1)[1]


@pytest.mark.parametrize("fmt", ["int", "fp8_e4m3"])
def test_learnable_step_receives_gradient(fmt):
    spec = QuantSpec(bits=4) if fmt == "int" else QuantSpec(bits=8, fmt=fmt)
    aq = ActQuantizer(spec, method="minmax", learnable=True)
    assert isinstance(aq.scale, torch.nn.Parameter)
    aq.set_range(-1.0, 1.0)
    x = (torch.randn(8, 16) * 2).requires_grad_(True)
    out = aq(x)
    ((out - x.detach() * 0.5) ** 2).sum().backward()
    assert aq.scale.grad is not None and torch.isfinite(aq.scale.grad)
    assert aq.scale.grad.item() != 0.0
    v = x.detach() / aq.scale.detach()
    lim = 7.0 if fmt == "int" else FLOAT_FORMATS[fmt].max_value
    inside = (v >= (-8.0 if fmt == "int" else -lim)) & (v <= lim)
    assert not torch.any((x.grad != 0) & ~inside)  # clipped values get no gradient
