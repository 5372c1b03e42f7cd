"""GPTQ against a naive OBQ-style reference, RTN, and its own invariants."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from smpq.backends.gptq import GPTQConfig, gptq_quantize, gptq_quantize_weight, prepare_hessian
from smpq.backends.hessian import hessian_from_inputs, output_error
from smpq.backends.rtn import rtn_quantize_weight
from smpq.errors import SmpqError
from smpq.primitives import choose_qparams, fake_quantize, int_range, round_to_minifloat
from smpq.spec import Granularity, QuantSpec

SPECS = {
    "int3_channel": QuantSpec(bits=3, granularity="channel"),
    "int4_g16_asym": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
    "int2_tensor": QuantSpec(bits=2, granularity="tensor"),
    "fp4_g16": QuantSpec(bits=4, fmt="fp4_e2m1", granularity="group", group_size=16),
    "int3_g12": QuantSpec(bits=3, granularity="group", group_size=12),
}


def correlated_inputs(n_tokens: int, n_in: int, rank: int, seed: int) -> torch.Tensor:
    """Inputs with a strong low-rank structure plus small noise and uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n_tokens, rank, generator=g) @ torch.randn(rank, n_in, generator=g)
    scales = torch.rand(n_in, generator=g) * 2 + 0.2
    return (low + 0.1 * torch.randn(n_tokens, n_in, generator=g)) * scales


def problem(out: int = 8, n_in: int = 48, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(out, n_in, generator=g, dtype=torch.float64).to(dtype)
    h = hessian_from_inputs(correlated_inputs(4 * n_in, n_in, 6, seed).double())
    return w, h


def naive_gptq(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, percdamp=0.01, act_order=False, static=False
) -> torch.Tensor:
    """Unblocked OBQ loop in float64 with an explicit inverse Hessian and its downdates."""
    W, H = w.double().clone(), h.double().clone()
    n = W.shape[1]
    idx = torch.arange(n)
    dead = H.diagonal() == 0
    H[idx[dead], idx[dead]] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else idx
    order = order.tolist()
    hinv = torch.linalg.inv(H + percdamp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype))
    cspec = replace(spec, granularity=Granularity.CHANNEL, group_size=None)
    group = spec.granularity is Granularity.GROUP
    gs = spec.group_size if group else n
    fixed = {}
    if not group:
        fixed[0] = choose_qparams(W, spec if spec.granularity is Granularity.TENSOR else cspec)
    elif static:
        fixed = {a // gs: choose_qparams(W[:, a : a + gs], cspec) for a in range(0, n, gs)}
    Q = torch.zeros_like(W)
    for pos, j in enumerate(order):
        if group and not static and pos % gs == 0:
            qp = choose_qparams(W[:, order[pos : pos + gs]], cspec)
        elif group and static:
            qp = fixed[j // gs]
        elif not group:
            qp = fixed[0]
        q = fake_quantize(W[:, j : j + 1], cspec, *qp)[:, 0]
        Q[:, j] = q
        err = (W[:, j] - q) / hinv[j, j]
        W -= err[:, None] * hinv[j][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return Q


def assert_on_grid(result, spec: QuantSpec) -> None:
    """Every value is scale * (a code of the format) for its column's group scale."""
    s = result.scale[:, result.group_index].double()
    v = result.weight.double() / s
    if spec.is_float:
        torch.testing.assert_close(round_to_minifloat(v, spec.minifloat), v, rtol=1e-5, atol=1e-6)
        return
    if result.zero_point is not None:
        v = v + result.zero_point[:, result.group_index].double()
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    torch.testing.assert_close(v, torch.round(v), rtol=0, atol=1e-4)
    assert v.min() >= qmin - 1e-4 and v.max() <= qmax + 1e-4


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("blocksize", [1, 5, 128])
def test_matches_naive_reference(name: str, act_order: bool, blocksize: int) -> None:
    spec = SPECS[name]
    w, h = problem(seed=1)
    want = naive_gptq(w, h, spec, act_order=act_order)
    cfg = GPTQConfig(blocksize=blocksize, act_order=act_order)
    got = gptq_quantize(w, h, spec, cfg)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-9)
    assert_on_grid(got, spec)


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_match_reference_and_are_contiguous(act_order: bool) -> None:
    spec = SPECS["int3_g12"]
    w, h = problem(seed=2)
    want = naive_gptq(w, h, spec, act_order=act_order, static=True)
    cfg = GPTQConfig(blocksize=7, act_order=act_order, static_groups=True)
    got = gptq_quantize(w, h, spec, cfg)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-9)
    assert got.group_index.tolist() == [c // 12 for c in range(48)]
    assert_on_grid(got, spec)


def test_blocking_does_not_change_float32_result() -> None:
    w, h = problem(out=16, n_in=96, seed=3, dtype=torch.float32)
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    a = gptq_quantize_weight(w, h, spec, GPTQConfig(blocksize=1, act_order=True))
    b = gptq_quantize_weight(w, h, spec, GPTQConfig(blocksize=40, act_order=True))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_beats_rtn_on_correlated_inputs(bits: int, gran: str) -> None:
    gs = 32 if gran == "group" else None
    spec = QuantSpec(bits=bits, granularity=gran, group_size=gs)
    x = correlated_inputs(512, 128, 8, seed=4)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    h = hessian_from_inputs(x.double())
    q_gptq = gptq_quantize_weight(w, h, spec)
    q_rtn = rtn_quantize_weight(w, spec)
    err_gptq = ((x @ (w - q_gptq).T) ** 2).sum()
    err_rtn = ((x @ (w - q_rtn).T) ** 2).sum()
    assert err_gptq < 0.7 * err_rtn


@pytest.mark.parametrize("name", ["int3_channel", "int3_g12", "int2_tensor", "fp4_g16"])
def test_identity_hessian_equals_rtn(name: str) -> None:
    spec = SPECS[name]
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(6))
    got = gptq_quantize_weight(w, torch.eye(48), spec, GPTQConfig(blocksize=16))
    assert torch.equal(got, rtn_quantize_weight(w, spec))


def test_dead_inputs() -> None:
    w, h = problem(seed=7)
    dead = torch.tensor([0, 5, 17, 47])
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    spec = SPECS["int4_g16_asym"]
    res = gptq_quantize(w, h, spec, GPTQConfig(blocksize=8, act_order=True))
    assert torch.isfinite(res.weight).all() and res.loss == res.loss
    assert (res.weight[:, dead] == 0).all()
    want = naive_gptq(w, h, spec, act_order=True)
    torch.testing.assert_close(res.weight, want, rtol=0, atol=1e-9)
    all_dead = gptq_quantize_weight(w, torch.zeros(48, 48), SPECS["int3_channel"])
    assert (all_dead == 0).all()


def test_indefinite_hessian_without_damping_is_retried(caplog) -> None:
    x = correlated_inputs(8, 32, 3, seed=8).double()  # rank 8 < 32
    w = torch.randn(4, 32, dtype=torch.float64)
    h = hessian_from_inputs(x)
    h[:, 0] = h[0, :] = 0.0
    h[0, 0] = -1e-3  # indefinite after the dead-input check: needs the retry
    with pytest.raises(SmpqError, match="negative diagonal"):
        prepare_hessian(h)
    h[0, 0] = 1e-12
    h[0, 1] = h[1, 0] = 0.01 * h[1, 1].sqrt()  # not PSD: undamped Cholesky fails
    with caplog.at_level("WARNING", logger="smpq.backends.gptq"):
        prep = prepare_hessian(h, GPTQConfig(percdamp=0))
    assert prep.damp > 0 and "retrying" in caplog.text
    q = gptq_quantize_weight(w, prep, SPECS["int3_channel"])
    assert torch.isfinite(q).all()


def test_loss_is_half_damped_objective() -> None:
    w, h = problem(seed=9)
    res = gptq_quantize(w, h, SPECS["int3_g12"], GPTQConfig(blocksize=10))
    damp = prepare_hessian(h).damp
    hd = h + damp * torch.eye(h.shape[0], dtype=h.dtype)
    assert res.loss == pytest.approx(0.5 * float(output_error(res.weight - w, hd)), rel=1e-9)


def test_prepared_hessian_is_reusable_across_specs() -> None:
    w, h = problem(seed=10)
    prep = prepare_hessian(h, GPTQConfig(act_order=True))
    for spec in SPECS.values():
        direct = gptq_quantize_weight(w, h, spec, GPTQConfig(act_order=True))
        torch.testing.assert_close(gptq_quantize_weight(w, prep, spec), direct, rtol=0, atol=0)


def test_dtype_shape_and_errors() -> None:
    w, h = problem(seed=11, dtype=torch.float32)
    q = gptq_quantize_weight(w.half(), h, SPECS["int3_channel"])
    assert q.dtype == torch.float16 and q.shape == w.shape
    with pytest.raises(SmpqError, match="does not match"):
        gptq_quantize_weight(w[:, :10], h, SPECS["int3_channel"])
    with pytest.raises(SmpqError, match="2-D"):
        gptq_quantize_weight(w[0], h, SPECS["int3_channel"])
    with pytest.raises(SmpqError, match="NaN"):
        gptq_quantize_weight(w, h * float("nan"), SPECS["int3_channel"])
    with pytest.raises(SmpqError, match="square"):
        prepare_hessian(h[:3])
    with pytest.raises(SmpqError):
        GPTQConfig(blocksize=0)
    with pytest.raises(SmpqError):
        GPTQConfig(percdamp=-1.0)
