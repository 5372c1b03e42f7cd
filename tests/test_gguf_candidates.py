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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from smpq.transformer.tiny_lm import ByteTokenizer

    folder = tmp_path_factory.mktemp("llama96")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=96, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    ByteTokenizer().save(folder)
    return folder


@pytest.fixture(scope="module")
def session(folder):
    return PTQSession(str(folder), "rtn", CANDS, SMALL).prepare()


def _can_store(session, name: str, fmt: str) -> bool:
    return session.linears[name].in_features % _sizes(fmt)[0] == 0


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
    best, best_choice = -np.inf, None
    for choice in itertools.product(*allowed):
        if _size_bits(session, choice) <= limit * (1 + 1e-9):
            v = sum(scores[g][k] for g, k in enumerate(choice))
            if v > best:
                best, best_choice = v, choice
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
