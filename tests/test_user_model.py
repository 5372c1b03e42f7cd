"""A model the project did not write: subclassed layers, unsupported ones, and search entry."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from smpq.apply import (
    calibrate_,
    dequantize_,
    quantizable_layers,
    quantize_,
    skipped_layers,
)
from smpq.cnn.data import get_splits
from smpq.cnn.pipeline import default_pinned
from smpq.cnn.search import SearchConfig, search
from smpq.cost import Budget, trace_costs
from smpq.errors import SmpqError
from smpq.modules import QuantLayer
from smpq.policy import Policy
from smpq.spec import LayerChoice


def _count(mod, inputs, output):
    mod.calls += 1


class HookedConv(nn.Conv2d):
    """A user's conv: same computation, plus an instance hook and an attribute."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.register_forward_hook(_count)


class TaggedLinear(nn.Linear):
    tag = "user"


class FusedConv(nn.Conv2d):
    """Overrides forward (a fused activation): the quantized layer cannot reproduce it."""

    def forward(self, x):
        return F.relu(super().forward(x))


class UserNet(nn.Module):
    def __init__(self, hooked=HookedConv, tagged=TaggedLinear):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = hooked(4, 8, 3, padding=1)
        self.fused = FusedConv(8, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.mid = tagged(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # (B, 1, 8, 8)
        x = self.fused(F.relu(self.body(F.relu(self.stem(x)))))  # (B, 8, 8, 8)
        x = self.seq(x.mean(dim=2))  # (B, 8, 8)
        return self.head(F.relu(self.mid(x.flatten(1))))


def _twin(model: UserNet) -> UserNet:
    """The same network built from plain nn.Conv2d / nn.Linear, with the same weights."""
    twin = UserNet(hooked=nn.Conv2d, tagged=nn.Linear)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_subclasses_are_found_and_quantized_like_plain_layers():
    torch.manual_seed(0)
    model = UserNet().eval()
    assert list(quantizable_layers(model)) == ["stem", "body", "mid", "head"]
    twin = _twin(model)
    x = torch.randn(5, 1, 8, 8)
    pol = Policy({n: LayerChoice.bits(4, 4) for n in ("stem", "body", "mid", "head")})
    for net in (model, twin):
        calibrate_(quantize_(net, pol, act_method="minmax"), [x])
    assert isinstance(model.body, QuantLayer) and isinstance(model.mid, QuantLayer)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    before = model.body.calls
    model(x)
    assert model.body.calls == before + 1  # the user's hook still runs on the quantized layer
    dequantize_(model)
    assert type(model.body) is HookedConv and type(model.mid) is TaggedLinear
    with torch.no_grad():
        assert torch.equal(model(x), _twin(model)(x))


def test_unreproducible_and_unsupported_modules_are_skipped_with_a_reason():
    model = nn.Module()
    model.fused = FusedConv(1, 2, 3)
    model.wn = parametrizations.weight_norm(nn.Linear(4, 4))
    model.attn = nn.MultiheadAttention(8, 2)
    model.conv1d = nn.Conv1d(2, 2, 3)
    model.deconv = nn.ConvTranspose2d(2, 2, 3)
    model.emb = nn.Embedding(10, 4)
    model.lazy = nn.LazyLinear(3)
    model.norm = nn.LayerNorm(4)  # a 1-D weight: not a layer to report
    model.ok = TaggedLinear(4, 4)
    assert list(quantizable_layers(model)) == ["ok"]
    why = skipped_layers(model)
    assert set(why) == {"fused", "wn", "attn", "attn.out_proj", "conv1d", "deconv", "emb",
                        "lazy"}
    assert "overrides forward()" in why["fused"]
    assert "parametrizations" in why["wn"]
    assert "MultiheadAttention" in why["attn.out_proj"]
    assert "in_proj_weight" in why["attn"]
    for name, kind in [("conv1d", "Conv1d"), ("deconv", "ConvTranspose2d"),
                       ("emb", "Embedding")]:
        assert why[name].startswith(f"{kind} is not supported")
    assert "lazy" in why["lazy"]


def test_patterns_and_pins_are_reasons_too():
    model = UserNet()
    why = skipped_layers(model, exclude=["head"], pinned=default_pinned(["stem", "mid"]))
    assert why["head"] == "excluded by ['head']"
    assert why["stem"] == "pinned at Wint8/Aint8, not searched"
    assert why["mid"] == "pinned at Wint8/Aint8, not searched"
    assert "body" not in why and {"fused", "seq"} <= set(why)
    assert skipped_layers(model, include=["b*"])["stem"] == "not matched by include ['b*']"
    with pytest.raises(SmpqError, match="skipped: .*fused.*overrides forward"):
        quantizable_layers(model, include=["fused"])


def test_layers_command_prints_skipped_modules(monkeypatch, capsys):
    from smpq import cli

    splits = get_splits("digits")
    monkeypatch.setattr(cli, "fp_model", lambda *a, **k: (UserNet().eval(), splits, {}))
    monkeypatch.setattr(sys, "argv", ["smpq", "layers"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "skipped fused: FusedConv overrides forward()" in out
    assert "skipped seq: Conv1d is not supported" in out
    assert "skipped stem: pinned at Wint8/Aint8" in out
    assert "skipped body" not in out and "HookedConv" in out  # listed as quantizable


FAST = dict(epochs=2, permutations=2, w_bits=(2, 4), a_bits=(4, 8), val_samples=60,
            batch_size=128)


def test_search_on_a_user_model_searches_its_subclassed_layers():
    splits = get_splits("digits")
    model = UserNet().eval()
    cost = trace_costs(model, splits.val[0][0][None])
    fixed = default_pinned(cost.names)
    out = search(model, splits.train, splits.val, cost, Budget.parse("bitops=uniform:4/4"),
                 SearchConfig(**FAST), fixed=fixed)
    assert {p["layer"] for p in out.contributions["players"]} == {"body", "mid"}
    assert isinstance(out.contributions["biased"], bool)


def test_search_with_everything_pinned_says_so():
    splits = get_splits("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    cost = trace_costs(model, splits.val[0][0][None])
    with pytest.raises(SmpqError, match="nothing left to search: .*1, 3"):
        search(model, splits.train, splits.val, cost, Budget.parse("bitops=uniform:4/4"),
               SearchConfig(**FAST), fixed=default_pinned(cost.names))
    with pytest.raises(SmpqError, match="cannot pin ghost"):
        search(model, splits.train, splits.val, cost, Budget.parse("bitops=uniform:4/4"),
               SearchConfig(**FAST), fixed={"ghost": LayerChoice.bits(8, 8)})
