"""Model shapes, quantizable-layer counts, one call per layer, configs and the registry."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

from smpq.apply import quantizable_layers
from smpq.cnn.models import MODELS, build_model, model_from_config
from smpq.errors import SmpqError

SHAPES = [("mlp", (1, 8, 8)), ("small_resnet", (1, 8, 8)), ("resnet20", (1, 8, 8))]


@pytest.mark.parametrize("name, shape", [*SHAPES, ("resnet20", (3, 32, 32))])
def test_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 7, seed=0).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_quantizable_layer_counts() -> None:
    counts = {n: len(quantizable_layers(build_model(n, s, 10))) for n, s in SHAPES}
    assert counts["mlp"] == 3
    assert counts["small_resnet"] >= 6
    assert 19 <= counts["resnet20"] <= 23


def test_small_resnet_is_small() -> None:
    model = build_model("small_resnet", (1, 8, 8), 10)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(convs) == 1 and convs[0].stride == (2, 2)


@pytest.mark.parametrize("name, shape", SHAPES)
def test_every_conv_and_linear_runs_exactly_once(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 10)
    calls: Counter[str] = Counter()
    for fqn, layer in quantizable_layers(model).items():
        layer.register_forward_hook(lambda *_, fqn=fqn: calls.update([fqn]))
    model(torch.randn(2, *shape))
    assert set(calls) == set(quantizable_layers(model))
    assert set(calls.values()) == {1}


@pytest.mark.parametrize("name, shape", SHAPES)
def test_config_round_trips_through_json(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 10, seed=3)
    config = json.loads(json.dumps(model.config))
    rebuilt = model_from_config(config)
    assert rebuilt.config == model.config and type(rebuilt) is type(model)
    assert model.state_dict().keys() == rebuilt.state_dict().keys()


def test_seeded_build_is_reproducible_and_keeps_global_rng() -> None:
    state = torch.get_rng_state()
    a = build_model("small_resnet", (1, 8, 8), 10, seed=5)
    b = build_model("small_resnet", (1, 8, 8), 10, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_mlp_hidden_and_width_options() -> None:
    mlp = build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    assert [m.out_features for m in quantizable_layers(mlp).values()] == [32, 10]
    wide = build_model("resnet20", (1, 8, 8), 10, width=8)
    assert wide.fc.in_features == 32


def test_registry_errors() -> None:
    assert set(MODELS) == {"mlp", "small_resnet", "resnet20"}
    with pytest.raises(SmpqError, match="known: mlp, resnet20, small_resnet"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(SmpqError, match="no option"):
        build_model("mlp", (1, 8, 8), 10, depth=3)
    with pytest.raises(SmpqError, match="width"):
        build_model("small_resnet", (1, 8, 8), 10, width=0)
    with pytest.raises(SmpqError, match="input_shape"):
        build_model("small_resnet", (8, 8), 10)
    with pytest.raises(SmpqError, match="unknown model"):
        model_from_config({"name": "nope", "kwargs": {}})
