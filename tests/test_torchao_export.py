"""The exported torchao per-FQN config, applied by torchao itself on CPU, against our model."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao", reason="torchao is not installed (optional; docs/EXPORTS.md)")

from conftest import save_tiny_llama  # noqa: E402
from smpq.export import load_quantized, torchao_configs, torchao_snippet  # noqa: E402
from smpq.policy import Policy  # noqa: E402
from smpq.primitives import fake_quantize  # noqa: E402
from smpq.spec import LayerChoice  # noqa: E402
from smpq.transformer.run import RunSettings, run_ptq  # noqa: E402
from smpq.transformer.scores import parse_candidates  # noqa: E402

SMALL = RunSettings(block=32, calib_blocks=2, val_blocks=2, test_blocks=2)


def _apply(source: str, model: torch.nn.Module) -> torch.nn.Module:
    ns: dict = {}
    exec(compile(source, "torchao_config.py", "exec"), ns)  # the exported file, as a user would
    ns["quantize_"](model, ns["config"], filter_fn=None)
    return model


def test_exported_config_reproduces_our_logits(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama")  # input sizes 32 and 64: whole groups of 32
    out = tmp_path / "run"
    run_ptq(str(folder), "avg_bits=3", "rtn", "fisher", out,
            settings=replace(SMALL, cache_dir=str(tmp_path / "cache")))
    policy = Policy.load(out / "policy.json")
    assert len({c.weight.bits for c in policy.layers.values() if c}) >= 2  # a real mix
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder)).eval()
    ao = _apply((out / "exports" / "torchao_config.py").read_text(), copy.deepcopy(model))
    ours = load_quantized(out, copy.deepcopy(model))
    ref = copy.deepcopy(model)  # independent: primitives' fake quantization of each weight
    with torch.no_grad():
        for name, c in policy.layers.items():
            if c is not None:
                w = ref.get_submodule(name).weight
                w.copy_(fake_quantize(w, c.weight))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, mine = ao(ids).logits, ref(ids).logits, ours(ids).logits
        float_gap = (model(ids).logits - want).abs().max()
    assert float_gap > 1e-2  # quantization is visible, so agreement means something
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert torch.allclose(got, mine, rtol=0, atol=1e-5)


def test_symmetric_specs_are_flagged_and_do_differ():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16)).eval()
    int4 = parse_candidates("int4g32-sym,int8g32")[0]  # Int4WeightOnlyConfig: no CPU path
    assert any("approximated" in w for w in torchao_configs(
        Policy({"0": LayerChoice(int4, None)}))[1])
    spec = parse_candidates("int3g32-sym,int8g32")[0]
    configs, warnings = torchao_configs(Policy({"0": LayerChoice(spec, None)}))
    assert configs["0"]["config"] == "IntxWeightOnlyConfig"
    assert any("approximated" in w for w in warnings)
    ao = _apply(torchao_snippet(configs), copy.deepcopy(model))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = torch.nn.functional.linear(x, fake_quantize(model[0].weight, spec), model[0].bias)
        assert (ao(x) - ours).abs().max() > 1e-4  # torchao's symmetric grid is not ours
