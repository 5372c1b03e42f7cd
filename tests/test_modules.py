"""Quantized layers against direct computations with torch's own ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smpq.apply import (
    calibrate_,
    dequantize_,
    quant_layers,
    quantizable_layers,
    quantize_,
    supernet_,
)
from smpq.errors import SmpqError
from smpq.modules import QuantConv2d, QuantLinear
from smpq.policy import Policy
from smpq.primitives import fake_quantize
from smpq.spec import LayerChoice, QuantSpec, act_spec, weight_spec


def _conv(x, m, w):
    return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)


def test_float_specs_reproduce_float_model_exactly(tiny, images):
    ref = tiny(images)
    supernet_(tiny, [None], [None])
    assert all(isinstance(m, (QuantConv2d, QuantLinear)) for m in quant_layers(tiny).values())
    assert torch.equal(tiny(images), ref)
    dequantize_(tiny)
    assert not quant_layers(tiny)
    assert torch.equal(tiny(images), ref)


def test_conv_keeps_groups_stride_dilation_padding(tiny, images):
    conv = tiny.body[0]
    x = torch.relu(tiny.stem(images))
    spec = weight_spec(4)
    q = QuantConv2d.from_float(conv, [spec], [None])
    expect = _conv(x, conv, fake_quantize(conv.weight, spec))
    assert torch.allclose(q(x), expect, atol=1e-6)
    assert q.weight is conv.weight  # parameters are shared, not copied


def test_state_dict_keys_kept(tiny):
    keys = set(tiny.state_dict())
    quantize_(tiny, Policy.uniform(quantizable_layers(tiny), 4, 8))
    assert keys <= set(tiny.state_dict())


def test_mixing_without_renormalisation():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    specs = [weight_spec(2), weight_spec(4), weight_spec(8)]
    q = QuantLinear.from_float(lin, specs, [None])
    with torch.no_grad():
        q.alpha_w.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(3, 12)
    c = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), 0)
    wq = [fake_quantize(lin.weight, s) for s in specs]
    full = F.linear(x, c[0] * wq[0] + c[1] * wq[1] + c[2] * wq[2], lin.bias)
    assert torch.allclose(q(x), full, atol=1e-6)
    q.set_active([True, False, True], [True])
    part = F.linear(x, c[0] * wq[0] + c[2] * wq[2], lin.bias)  # c not renormalised
    assert torch.allclose(q(x), part, atol=1e-6)


@pytest.mark.parametrize("empty", ["zero", "float"])
def test_layer_with_no_active_branch(empty):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    q = QuantLinear.from_float(lin, [weight_spec(2), weight_spec(4)], [None], empty=empty)
    q.set_active([False, False], [True])
    x = torch.randn(2, 6)
    expect = lin.bias.expand(2, 4) if empty == "zero" else F.linear(x, lin.weight, lin.bias)
    assert torch.allclose(q(x), expect)


def test_quantized_weight_cache_invalidates_on_change():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    q = QuantLinear.from_float(lin, [weight_spec(4)], [None])
    with torch.no_grad():
        a = q.quantized_weight(0)
        assert q.quantized_weight(0) is a  # cached
        lin.weight.mul_(2.0)
        b = q.quantized_weight(0)
    assert b is not a
    assert torch.allclose(b, fake_quantize(lin.weight.detach(), weight_spec(4)))


def test_activation_quantization_after_calibration(tiny, images):
    quantize_(tiny, Policy.uniform(quantizable_layers(tiny), 8, 4))
    with pytest.raises(SmpqError, match="calibration"):
        tiny(images)
    calibrate_(tiny, [images])
    fc = tiny.fc
    x = torch.randn(5, 128).abs()
    out = fc(x)
    xq = fc.a_quant[0](x)
    assert len(torch.unique(xq)) <= 16  # 4-bit activations take at most 16 values
    assert torch.allclose(out, F.linear(xq, fake_quantize(fc.weight, weight_spec(8)), fc.bias))


def test_qat_gradients_reach_weights_and_steps(tiny, images):
    quantize_(tiny, Policy.uniform(quantizable_layers(tiny), 4, 4), learnable=True)
    calibrate_(tiny, [images])
    tiny.train()
    tiny(images).square().mean().backward()
    for name, layer in quant_layers(tiny).items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
        steps = [p for p in layer.w_quant.parameters()] + [p for p in layer.a_quant.parameters()]
        assert steps and all(p.grad is not None for p in steps), name


def test_include_exclude_patterns(tiny):
    assert list(quantizable_layers(tiny, exclude=["fc", "stem"])) == ["body.0", "proj"]
    assert list(quantizable_layers(tiny, include=["body.*"])) == ["body.0"]


def test_bad_models_and_layers(tiny):
    with pytest.raises(SmpqError, match="no quantizable layers"):
        quantizable_layers(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(SmpqError, match="unknown layer"):
        supernet_(tiny, [weight_spec(4)], [act_spec(4)], layers=["nope"])
    with torch.no_grad():
        tiny.proj.weight[0, 0] = float("nan")
    with pytest.raises(SmpqError, match="non-finite"):
        quantize_(tiny, Policy.uniform(quantizable_layers(tiny), 4, 4))


def test_minifloat_candidates_in_layers(tiny, images):
    choice = LayerChoice(QuantSpec(8, fmt="fp8_e4m3", granularity="channel"), None)
    ref = tiny(images)
    quantize_(tiny, Policy({n: choice for n in quantizable_layers(tiny)}))
    out = tiny(images)
    err = (out - ref).norm() / ref.norm()
    assert 0 < err < 0.05
