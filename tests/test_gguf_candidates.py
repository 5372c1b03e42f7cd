"""GGUF block formats as transformer candidates: availability per share group and budgets in
bytes, on a tiny random Llama whose attention/gate/up rows have 96 columns (32-blocks only) and
whose down projections have 256 (K-quants too).

References are independent of the allocators: availability from the layer shapes and the block
sizes of `gguf.GGML_QUANT_SIZES`, sizes from parameter counts and those bytes per block, the
score methods' optimum by brute force over every allowed policy.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from smpq import strategy  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.strategy import SearchProblem  # noqa: E402
from smpq.transformer.mixed import MixedConfig  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings  # noqa: E402
from smpq.transformer.scores import GGUF_CANDIDATES, parse_candidates, spec_key  # noqa: E402

CANDS = "q2_k,q3_k,q4_0,q4_k,q5_0,q8_0"
SMALL = RunSettings(block=32, calib_blocks=4, val_blocks=4, test_blocks=4,
                    shapley=MixedConfig(permutations=4, tolerance=None))
SHAPLEY_GAME = ("shapley", "shapley_pairwise", "shapley_literal")


def _sizes(fmt: str) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.upper()]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _save_llama(folder, tied: bool):
    from smpq.transformer.tiny_lm import ByteTokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=96, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    ByteTokenizer().save(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_llama(tmp_path_factory.mktemp("llama96"), tied=False)


@pytest.fixture(scope="module")
def session(folder):
    return PTQSession(str(folder), "rtn", CANDS, SMALL).prepare()


def _can_store(session, name: str, fmt: str) -> bool:
    return session.linears[name].weight.shape[1] % _sizes(fmt)[0] == 0


def _allowed_by_shape(session) -> list[list[int]]:
    return [[k for k, s in enumerate(session.specs)
             if all(_can_store(session, n, s.fmt) for n in g)] for g in session.groups]


def _size_bits(session, choice) -> float:
    """Every linear's weight at its format's bytes per block, everything else at 32 bits."""
    bits = 0.0
    for g, k in zip(session.groups, choice, strict=True):
        block, size = _sizes(session.specs[k].fmt)
        for n in g:
            w = session.linears[n].weight
            bits += 8 * w.shape[0] * (w.shape[1] // block) * size
    lin = {id(m.weight) for m in session.linears.values()}
    other = sum(p.numel() for p in session.model.parameters() if id(p) not in lin)
    return bits + 32 * other


def test_presets_and_lists_parse():
    specs = parse_candidates("gguf")
    assert [spec_key(s) for s in specs] == sorted(GGUF_CANDIDATES.split(","),
                                                  key=lambda k: [s for s in specs
                                                                 if spec_key(s) == k][0].bits)
    assert len(specs) == 11 and all(s.is_block for s in specs)
    assert [spec_key(s) for s in parse_candidates("q4_0,q5_1,q8_0,q3_k")] == [
        "q3_k", "q4_0", "q5_1", "q8_0"]
    assert {spec_key(s) for s in parse_candidates("int4g32,q4_k")} == {"int4g32", "q4_k"}
    with pytest.raises(SmpqError, match="cannot read candidate"):
        parse_candidates("q4_0,q9_k")


def test_allowed_groups_and_only_those_are_built(session):
    want = _allowed_by_shape(session)
    assert [list(a) for a in session.allowed] == want
    assert any(len(a) == len(session.specs) for a in want)  # down_proj: K-quants too
    assert any(len(a) < len(session.specs) for a in want)   # 96 columns: 32-blocks only
    keys = session.candidates.keys
    for g, a in zip(session.groups, want, strict=True):
        for n in g:
            assert set(session.candidates.weights[n]) == {keys[k] for k in a}
    assert session.candidates.built + session.candidates.loaded == sum(
        len(a) * len(g) for g, a in zip(session.groups, want, strict=True))


def _limit(session, frac: float) -> float:
    allowed = _allowed_by_shape(session)
    lo = _size_bits(session, [min(a, key=lambda k: _sizes(session.specs[k].fmt)[1]
                                  / _sizes(session.specs[k].fmt)[0]) for a in allowed])
    hi = _size_bits(session, [max(a, key=lambda k: _sizes(session.specs[k].fmt)[1]
                                  / _sizes(session.specs[k].fmt)[0]) for a in allowed])
    return lo + frac * (hi - lo)


@pytest.mark.parametrize("name", strategy.names("transformer"))
def test_every_strategy_uses_allowed_formats_within_bytes(session, name):
    limit = _limit(session, 0.4)
    budget = Budget.parse(f"size={limit / 8}B")
    problem = SearchProblem(session, session.cost, budget, session.specs, seed=0,
                            options={"n_evaluations": 14, "top_k": 3})
    if name in SHAPLEY_GAME:
        with pytest.raises(SmpqError, match="cannot store"):
            strategy.get(name, "transformer")(problem)
        return
    res = strategy.get(name, "transformer")(problem)
    choice = res.detail.choice
    for g, k in zip(session.groups, choice, strict=True):
        for n in g:
            assert _can_store(session, n, session.specs[k].fmt), (n, session.specs[k].fmt)
            assert res.policy.layers[n].weight == session.specs[k]
    assert _size_bits(session, choice) <= limit * (1 + 1e-9)
    assert session.cost.metrics(res.policy)["size"] == pytest.approx(_size_bits(session, choice),
                                                                      rel=1e-12)


@pytest.mark.parametrize("method", ["fisher", "hessian"])
def test_score_methods_find_the_brute_force_optimum(session, method):
    limit = _limit(session, 0.5)
    budget = Budget.parse(f"size={limit / 8}B")
    scores, _, _ = session.baseline(method)
    allowed = _allowed_by_shape(session)
    base = _size_bits(session, [a[0] for a in allowed])
    # per group and allowed candidate: (score, size change against the group's first option)
    opts = []
    for g, a in enumerate(allowed):
        ref = [a2[0] for a2 in allowed]
        opts.append([(scores[g][k], _size_bits(session, ref[:g] + [k] + ref[g + 1:]) - base, k)
                     for k in a])
    best, best_choice = -np.inf, None
    for combo in itertools.product(*opts):
        if base + sum(c[1] for c in combo) <= limit * (1 + 1e-9):
            v = sum(c[0] for c in combo)
            if v > best:
                best, best_choice = v, tuple(c[2] for c in combo)
    problem = SearchProblem(session, session.cost, budget, session.specs, seed=0)
    got = strategy.get(method, "transformer")(problem).detail.choice
    assert sum(scores[g][k] for g, k in enumerate(got)) == pytest.approx(best, rel=1e-9)
    assert best_choice is not None


def test_budget_below_the_cheapest_allowed_policy_is_refused(session):
    lo = _limit(session, 0.0)
    with pytest.raises(SmpqError, match="budget infeasible"):
        session.resolve(Budget.parse(f"size={lo / 8 * 0.999}B"))
    session.resolve(Budget.parse(f"size={lo / 8 * 1.0001}B"))  # K-quant-free groups fit


def test_run_ptq_writes_the_llama_cpp_types_and_no_packed_checkpoint(folder, tmp_path):
    from smpq.policy import Policy
    from smpq.transformer.run import run_ptq

    out = tmp_path / "run"
    summary = run_ptq(str(folder), "eff_bits=4.8", "rtn", "fisher", out, "gguf",
                      settings=SMALL)
    assert all(r["ok"] for r in summary["budget_check"])
    assert "no packed checkpoint" in summary["checkpoint_note"]
    assert not (out / "model.safetensors").exists()
    policy = Policy.load(out / "policy.json")
    lines = (out / "exports" / "llama_cpp_tensor_types.txt").read_text().split()
    types = dict(line.split("=") for line in lines)
    for name, choice in policy.layers.items():
        fmt = choice.weight.fmt
        cols = 256 if name.endswith("down_proj") else 96  # the config's widths
        assert cols % _sizes(fmt)[0] == 0, (name, fmt)
    assert sorted(set(types.values())) == sorted({c.weight.fmt for c in policy.layers.values()})


def test_embedding_and_output_layer_are_units(session, folder):
    names = [g[0] for g in session.groups]
    assert names[0] == "model.embed_tokens" and names[-1] == "lm_head"  # untied: two units
    assert session.cost.layers["model.embed_tokens"].macs == 0  # a lookup
    units = sum(m.weight.numel() for m in session.linears.values())
    assert session.cost.other_params == sum(p.numel() for p in session.model.parameters()) - units
    mixed = PTQSession(str(folder), "rtn", "int4g32,q4_0", SMALL)  # not all GGUF: linears only
    assert "model.embed_tokens" not in mixed.linears and "lm_head" not in mixed.linears


def test_tied_embedding_hessian_error_is_both_uses_output_error(tmp_path):
    """The tied embedding's hessian error against the output error of both of its uses,
    measured directly: 2/N sum_n |dW[t_n]|^2 (lookup) + 2/N sum_n |dW x_n|^2 (output layer,
    x_n its inputs caught by a hook)."""
    from smpq.transformer.scores import layer_errors

    s = PTQSession(str(_save_llama(tmp_path / "tied", tied=True)), "rtn", CANDS, SMALL).prepare()
    assert [g[0] for g in s.groups][0] == "model.embed_tokens"
    assert "lm_head" not in s.linears
    s.swapper.restore()
    errors = layer_errors("hessian", s.linears, s.candidates, stats=s.stats())
    xs = []
    hook = s.model.lm_head.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in s.calib_batches:
            s.forward_fn(s.model, b)
    hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    tokens = s.calib.flatten()
    w = s.model.model.embed_tokens.weight.detach().double()
    for k, key in enumerate(s.candidates.keys):
        q = s.candidates.weights["model.embed_tokens"].get(key)
        if q is None:
            assert np.isnan(errors["model.embed_tokens"][k])
            continue
        dw = q.double() - w
        ref = 2 * (dw[tokens].square().sum() + (x @ dw.T).square().sum()) / len(tokens)
        assert errors["model.embed_tokens"][k] == pytest.approx(float(ref), rel=1e-6)
