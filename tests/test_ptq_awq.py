"""AWQ scale search: reduces to RTN at alpha 0, helps on outlier channels, H == X objective."""

from __future__ import annotations

import pytest
import torch

from smpq.backends.awq import (
    AWQConfig,
    awq_quantize,
    awq_scales,
    awq_then,
    gptq_quantizer,
    rtn_quantizer,
)
from smpq.backends.gptq import GPTQConfig, gptq_quantize_weight
from smpq.backends.hessian import hessian_from_inputs, output_error, output_error_from_inputs
from smpq.backends.rtn import rtn_quantize_weight
from smpq.errors import SmpqError
from smpq.spec import QuantSpec

G32 = QuantSpec(bits=3, granularity="group", group_size=32)
CHANNEL = QuantSpec(bits=4, granularity="channel")


def outlier_case(seed: int = 0, n_in: int = 64, out: int = 32, dtype=torch.float64):
    """Inputs where a few channels are ~30x larger than the rest (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, n_in, generator=g, dtype=torch.float64)
    x[:, [3, 20, 41, 60]] *= 30.0
    w = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    return w.to(dtype), x.to(dtype)


def test_scales_are_normalised_and_alpha0_is_one() -> None:
    act = torch.tensor([0.0, 0.5, 2.0, 40.0])
    s = awq_scales(act, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert (s > 0).all()
    assert torch.equal(awq_scales(act, 0.0), torch.ones(4))


@pytest.mark.parametrize("spec", [G32, CHANNEL], ids=["g32", "channel"])
def test_alpha_zero_equals_rtn(spec: QuantSpec) -> None:
    w, x = outlier_case(dtype=torch.float32)
    res = awq_quantize(w, spec, x.abs().mean(0), x=x, config=AWQConfig(n_grid=1))
    assert res.alpha == 0.0
    assert torch.equal(res.weight, rtn_quantize_weight(w, spec))
    assert torch.equal(res.scales, torch.ones(64))


@pytest.mark.parametrize("spec", [G32, CHANNEL], ids=["g32", "channel"])
def test_strictly_better_than_rtn_on_outlier_channels(spec: QuantSpec) -> None:
    w, x = outlier_case()
    h = hessian_from_inputs(x)
    res = awq_quantize(w, spec, x.abs().mean(0), h=h)
    rtn_err = float(output_error(rtn_quantize_weight(w, spec) - w, h))
    assert res.errors[0] == pytest.approx(rtn_err, rel=1e-12)
    assert res.error == min(res.errors) and res.error < 0.8 * rtn_err
    assert res.alpha > 0
    assert res.error == pytest.approx(float(output_error(res.weight - w, h)), rel=1e-12)


def test_never_worse_than_rtn_without_outliers() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 64, generator=g, dtype=torch.float64)
    w = torch.randn(16, 64, generator=g, dtype=torch.float64)
    res = awq_quantize(w, G32, x.abs().mean(0), x=x)
    assert res.error <= float(output_error_from_inputs(rtn_quantize_weight(w, G32) - w, x))


def test_objective_via_hessian_matches_inputs() -> None:
    w, x = outlier_case(seed=1)
    act = x.abs().mean(0)
    via_x = awq_quantize(w, G32, act, x=x.reshape(4, 64, 64))  # (..., in) inputs are tokens
    via_h = awq_quantize(w, G32, act, h=hessian_from_inputs(x))
    assert via_x.alpha == via_h.alpha
    errs_x, errs_h = torch.tensor(via_x.errors), torch.tensor(via_h.errors)
    torch.testing.assert_close(errs_x, errs_h, rtol=1e-10, atol=0)
    torch.testing.assert_close(via_x.weight, via_h.weight, rtol=0, atol=0)


def test_effective_weight_is_scaled_quantized_weight() -> None:
    w, x = outlier_case(seed=2)
    res = awq_quantize(w, G32, x.abs().mean(0), x=x)
    scaled = w * res.scales
    torch.testing.assert_close(res.weight * res.scales, rtn_quantize_weight(scaled, G32))


def test_composes_with_gptq() -> None:
    w, x = outlier_case(seed=4)
    h, act = hessian_from_inputs(x), x.abs().mean(0)
    cfg = AWQConfig(n_grid=5)
    res = awq_quantize(w, G32, act, h=h, quantizer=gptq_quantizer(GPTQConfig()), config=cfg)
    gptq_err = float(output_error(gptq_quantize_weight(w, h, G32) - w, h))
    assert res.errors[0] == pytest.approx(gptq_err, rel=1e-9)
    assert res.error <= gptq_err
    # GPTQ sees the scaled problem: its result must match GPTQ on W diag(s), H' = D H D
    hs = h / (res.scales[:, None] * res.scales[None, :])
    want = gptq_quantize_weight(w * res.scales, hs, G32) / res.scales
    torch.testing.assert_close(res.weight, want)
    # choosing alpha with RTN and finishing with GPTQ
    cheap = awq_quantize(
        w, G32, act, h=h, quantizer=gptq_quantizer(), search_quantizer=rtn_quantizer, config=cfg
    )
    assert cheap.alpha == awq_quantize(w, G32, act, h=h, config=cfg).alpha
    assert cheap.error == pytest.approx(float(output_error(cheap.weight - w, h)), rel=1e-9)


def test_awq_then_backend_and_errors() -> None:
    w, x = outlier_case(seed=5, dtype=torch.float32)
    stats = {"hessian": hessian_from_inputs(x.double()), "act_absmean": x.abs().mean(0)}
    backend = awq_then(rtn_quantizer, config=AWQConfig(n_grid=4))
    q = backend(w, G32, stats)
    assert q.shape == w.shape and q.dtype == torch.float32
    with pytest.raises(SmpqError, match="act_absmean"):
        backend(w, G32, {"hessian": stats["hessian"]})
    with pytest.raises(SmpqError, match="hessian"):
        backend(w, G32, {"act_absmean": stats["act_absmean"], "hessian": None})
    with pytest.raises(SmpqError, match="Hessian h or calibration inputs"):
        awq_quantize(w, G32, stats["act_absmean"])
    with pytest.raises(SmpqError, match="shape"):
        awq_quantize(w, G32, stats["act_absmean"][:5], x=x)
    with pytest.raises(SmpqError):
        AWQConfig(n_grid=0)
