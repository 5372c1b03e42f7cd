"""Hooked statistics collection and the backend dispatch table on a tiny 2-layer MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smpq.backends import (
    BACKENDS,
    AWQConfig,
    HessianAccumulator,
    awq_quantize,
    collect_hessians,
    collect_input_stats,
    get_backend,
    gptq_quantize,
    gptq_quantizer,
    output_error,
    quantize_linear_weights,
)
from smpq.backends.hessian import hessian_from_inputs
from smpq.errors import SmpqError
from smpq.primitives import choose_qparams, int_range
from smpq.spec import QuantSpec

SPEC = QuantSpec(bits=3, granularity="group", group_size=8)
LAYERS = ["fc1", "fc2"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def make_batches() -> list[torch.Tensor]:
    """Three (batch, tokens, 16) batches with correlated features and two loud channels."""
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(4, 16, generator=g)
    out = []
    for _ in range(3):
        x = torch.randn(2, 10, 4, generator=g) @ mix + 0.05 * torch.randn(2, 10, 16, generator=g)
        x[..., [2, 9]] *= 8.0
        out.append(x)
    return out


@pytest.fixture
def mlp() -> MLP:
    return make_mlp()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return make_batches()


@pytest.fixture(scope="module")
def quantized() -> tuple[MLP, dict, dict[str, dict[str, torch.Tensor]]]:
    """(model, stats, {backend: {layer: weight}}) for every backend, computed once."""
    model = make_mlp()
    stats = collect_input_stats(model, LAYERS, make_batches())
    plan = {name: SPEC for name in LAYERS}
    return model, stats, {b: quantize_linear_weights(model, plan, b, stats) for b in BACKENDS}


def layer_inputs(model: MLP, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    with torch.no_grad():
        hid = model.act(model.fc1(x.float())).double()
    return {"fc1": x, "fc2": hid}


def assert_on_int_grid(values: torch.Tensor, scale, zero_point, spec: QuantSpec) -> None:
    v = values.double() / scale.double()
    if zero_point is not None:
        v = v + zero_point.double()
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    torch.testing.assert_close(v, torch.round(v), rtol=0, atol=1e-4)
    assert v.min() >= qmin - 1e-4 and v.max() <= qmax + 1e-4


def assert_rtn_grid(q: torch.Tensor, source: torch.Tensor) -> None:
    """q is on the grid of the min-max group scales of `source` (what RTN rounded)."""
    scale = choose_qparams(source, SPEC)[0].reshape(q.shape[0], -1, 1)
    assert_on_int_grid(q.reshape(q.shape[0], -1, SPEC.group_size), scale, None, SPEC)


def test_hooked_statistics_match_direct_computation(mlp, batches) -> None:
    stats = collect_input_stats(mlp, LAYERS, batches)
    inputs = layer_inputs(mlp, batches)
    for name, x in inputs.items():
        torch.testing.assert_close(stats[name]["hessian"], x.T @ x * (2.0 / x.shape[0]))
        torch.testing.assert_close(stats[name]["act_absmean"], x.abs().mean(0))
        assert stats[name]["n_tokens"] == 60
    hs = collect_hessians(mlp, LAYERS, batches)
    torch.testing.assert_close(hs["fc2"], stats["fc2"]["hessian"])
    assert not mlp.fc1._forward_pre_hooks and not mlp.fc2._forward_pre_hooks


def test_custom_forward_fn_and_float32(mlp, batches) -> None:
    dict_batches = [{"inputs": b} for b in batches]
    stats = collect_input_stats(
        mlp, ["fc2"], dict_batches, lambda m, b: m(b["inputs"]), dtype=torch.float32
    )
    assert stats["fc2"]["hessian"].dtype == torch.float32
    want = collect_input_stats(mlp, ["fc2"], batches)["fc2"]["hessian"]
    torch.testing.assert_close(stats["fc2"]["hessian"].double(), want, rtol=1e-5, atol=1e-5)
    no_h = collect_input_stats(mlp, ["fc1"], batches, hessian=False)
    assert no_h["fc1"]["hessian"] is None and no_h["fc1"]["act_absmean"].shape == (16,)


def test_accumulator_lifecycle() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(SmpqError, match="no calibration inputs"):
        acc.hessian()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    acc.add_batch(x[0])
    acc.add_batch(x[1:])
    torch.testing.assert_close(acc.hessian(), hessian_from_inputs(x))
    with pytest.raises(SmpqError, match=r"\(\.\.\., 4\)"):
        acc.add_batch(torch.randn(2, 3))
    acc.free()
    with pytest.raises(SmpqError, match="freed"):
        acc.hessian()


def test_collection_errors(mlp, batches) -> None:
    with pytest.raises(SmpqError, match="no layer named"):
        collect_input_stats(mlp, ["fc9"], batches)
    with pytest.raises(SmpqError, match="not an nn.Linear"):
        collect_input_stats(mlp, ["act"], batches)
    with pytest.raises(SmpqError, match="received no input"):
        collect_input_stats(mlp, ["fc1"], [])
    assert not mlp.fc1._forward_pre_hooks


def test_every_backend_is_on_the_grid(quantized) -> None:
    mlp, stats, outputs = quantized
    for backend, weights in outputs.items():
        assert set(weights) == set(LAYERS)
        for name, q in weights.items():
            w, st = getattr(mlp, name).weight.detach(), stats[name]
            assert q.shape == w.shape and q.dtype == w.dtype
            if backend == "rtn":
                assert_rtn_grid(q, w)
                continue
            if backend == "gptq":
                res = gptq_quantize(w, st["hessian"], SPEC)
                assert torch.equal(q, res.weight)
                s = res.scale[:, res.group_index]
                assert_on_int_grid(q, s, None, SPEC)
                continue
            # AWQ: W_eff * s is the inner quantizer's output on W diag(s)
            inner = gptq_quantizer() if backend == "awq_gptq" else None
            kw = {"quantizer": inner} if inner else {}
            awq = awq_quantize(w, SPEC, st["act_absmean"], h=st["hessian"], **kw)
            torch.testing.assert_close(q, awq.weight, rtol=0, atol=0)
            scaled_q = q.double() * awq.scales
            if backend == "awq_rtn":
                assert_rtn_grid(scaled_q, w.double() * awq.scales)
            else:
                hs = st["hessian"] / (awq.scales[:, None] * awq.scales[None, :])
                res = gptq_quantize(w.double() * awq.scales, hs, SPEC)
                assert_on_int_grid(scaled_q, res.scale[:, res.group_index], None, SPEC)


def test_gptq_and_awq_not_worse_than_rtn(quantized) -> None:
    mlp, stats, outputs = quantized
    errs = {}
    for backend, weights in outputs.items():
        for name, q in weights.items():
            dw = q.double() - getattr(mlp, name).weight.detach().double()
            errs[backend, name] = float(output_error(dw, stats[name]["hessian"]))
    for name in LAYERS:
        rtn = errs["rtn", name]
        assert errs["gptq", name] <= rtn
        assert errs["awq_rtn", name] <= rtn * (1 + 1e-6)
        assert errs["awq_gptq", name] <= errs["gptq", name] * (1 + 1e-6)


def test_model_untouched_and_plan_handling(mlp, batches) -> None:
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    stats = collect_input_stats(mlp, ["fc1"], batches)
    out = quantize_linear_weights(mlp, {"fc1": SPEC, "fc2": None}, "gptq", stats)
    assert list(out) == ["fc1"]
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k])
    out = quantize_linear_weights(mlp, {"fc2": QuantSpec(bits=4, granularity="channel")})
    assert list(out) == ["fc2"]  # rtn by default, no statistics needed
    custom = quantize_linear_weights(mlp, {"fc1": SPEC}, lambda w, s, st: w * 0)
    assert (custom["fc1"] == 0).all()


def test_backend_errors(mlp, batches) -> None:
    with pytest.raises(SmpqError, match="known: rtn, gptq, awq_rtn, awq_gptq"):
        get_backend("hqq")
    with pytest.raises(SmpqError, match="unknown PTQ backend"):
        quantize_linear_weights(mlp, {"fc1": SPEC}, "nope")
    with pytest.raises(SmpqError, match="hessian"):
        quantize_linear_weights(mlp, {"fc1": SPEC}, "gptq", stats=None)
    stats = collect_input_stats(mlp, ["fc1"], batches, hessian=False)
    with pytest.raises(SmpqError, match="hessian"):
        quantize_linear_weights(mlp, {"fc1": SPEC}, "awq_rtn", stats)
    with pytest.raises(SmpqError, match="no layer named"):
        quantize_linear_weights(mlp, {"nope": SPEC})
    with pytest.raises(SmpqError, match="QuantSpec"):
        quantize_linear_weights(mlp, {"fc1": 4})
    assert get_backend("awq_rtn") is BACKENDS["awq_rtn"]
    assert AWQConfig().alphas[:2] == [0.0, 0.05]
