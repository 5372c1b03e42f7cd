"""smpq.transformer.mixed / scores / run: the progressive Shapley game, baselines and the pipeline.

Everything runs on a tiny random LlamaForCausalLM (hidden 32, 2 layers) built from a config
and random token blocks: no download, seconds on a CPU.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from smpq.alloc import (  # noqa: E402
    allocate_bruteforce,
    allocate_milp,
    allocate_quadratic,
    uniform_choice,
)
from smpq.backends import collect_input_stats, output_error_from_inputs, rtn_quantize_weight  # noqa: E402
from smpq.cost import Budget, ModelCost  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.export import load_quantized  # noqa: E402
from smpq.policy import Policy  # noqa: E402
from smpq.shapley import exact_shapley  # noqa: E402
from smpq.transformer.mixed import (  # noqa: E402
    MixedConfig,
    ProgressiveGame,
    build_candidates,
    choice_policy,
    choice_scores,
    estimate_contributions,
    group_costs,
    interaction_matrix,
    pairwise_value,
    parse_candidates,
    spec_key,
)
from smpq.transformer.models import linear_layers, share_groups  # noqa: E402
from smpq.transformer.run import RunSettings, ptq_command, run_ptq  # noqa: E402
from smpq.transformer.scores import (  # noqa: E402
    baseline_scores,
    gradient_moments,
    lm_loss,
)
from smpq.transformer.tiny_lm import ByteTokenizer  # noqa: E402
from smpq.transformer.values import WeightSwapper, float_reference, kl_to_float  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _config():
    return transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config()).eval()
    blocks = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    linears = linear_layers(model)
    groups = share_groups(list(linears), "llama")
    specs = parse_candidates(CANDS)
    cands = build_candidates(linears, specs, "rtn")
    swapper = WeightSwapper(model, cands.weights)
    ref = float_reference(model, blocks)
    cost = ModelCost.from_linears(linears)
    return dict(model=model, blocks=blocks, linears=linears, groups=groups, specs=specs,
                cands=cands, swapper=swapper, ref=ref, cost=cost)


def _game(s, groups=None, ladder=True):
    groups = groups or s["groups"]
    keys = s["cands"].keys

    def evaluate(levels):
        s["swapper"].set({n: keys[k] for g, k in zip(groups, levels, strict=True) for n in g})
        return -kl_to_float(s["model"], s["ref"])

    return ProgressiveGame(len(groups), len(keys), evaluate, ladder=ladder)


def _exact_ladder(game):
    """Shapley value under 'each group leaves top-down': average over all interleavings."""
    lv = game.n_levels - 1
    labels = [g for g in range(game.n_groups) for _ in range(lv)]
    orders = set(itertools.permutations(labels))
    phi = np.zeros(game.n_players)
    for order in orders:
        levels = [lv] * game.n_groups
        before = game.value(levels)
        for g in order:
            levels[g] -= 1
            after = game.value(levels)
            phi[g * lv + levels[g]] += before - after
            before = after
    return phi / len(orders)


def test_game_ends_match_direct_kl(setup):
    s = setup
    game = _game(s)
    full = game(np.ones((1, game.n_players), bool))[0]
    empty = game(np.zeros((1, game.n_players), bool))[0]
    s["swapper"].restore()
    for spec, got in ((s["specs"][-1], full), (s["specs"][0], empty)):
        direct = copy.deepcopy(s["model"])
        for name in s["linears"]:
            layer = direct.get_submodule(name)
            layer.weight.data = rtn_quantize_weight(layer.weight.data, spec)
        assert got == pytest.approx(-kl_to_float(direct, s["ref"]), rel=1e-6, abs=1e-9)
    assert full > empty  # int8 everywhere is closer to float than int2 everywhere


def test_levels_highest_player_or_count(setup):
    mask = np.zeros(_game(setup).n_players, bool)
    mask[[0, 1, 3]] = True  # group 0: players of levels 1 and 2; group 1: level 2
    assert _game(setup, ladder=False).levels(mask)[:3] == (2, 2, 0)
    assert _game(setup, ladder=True).levels(mask)[:3] == (2, 1, 0)


def _additive_game(ladder):
    steps = np.array([[0.5, 0.3, 0.1], [2.0, 0.2, 0.05]])  # gains of c0->c1->c2->c3 per group
    f = np.concatenate([np.zeros((2, 1)), np.cumsum(steps, axis=1)], axis=1)
    game = ProgressiveGame(2, 4, lambda lv: float(f[0, lv[0]] + f[1, lv[1]]), ladder=ladder)
    return game, steps


def test_ladder_is_exact_for_additive_games_and_literal_game_is_biased():
    game, steps = _additive_game(ladder=True)
    res = estimate_contributions(game, MixedConfig(permutations=6, tolerance=None))
    np.testing.assert_allclose(res.estimate, steps.ravel(), atol=1e-12)
    np.testing.assert_allclose(res.stderr, 0.0, atol=1e-12)
    np.testing.assert_allclose(choice_scores(res.estimate, 2, 4)[1], [0, 2.0, 2.2, 2.25])
    literal, _ = _additive_game(ladder=False)
    a, b, c = steps.T
    want = np.stack([a / 3, a / 3 + b / 2, a / 3 + b / 2 + c], axis=1).ravel()
    np.testing.assert_allclose(exact_shapley(literal, 6).estimate, want, atol=1e-12)


@pytest.fixture(scope="module")
def small(setup):
    """Four groups (layer 0) x two upper candidates = 8 players, exact by enumeration."""
    groups = setup["groups"][:4]
    game = _game(setup, groups)
    exact = _exact_ladder(game)
    setup["swapper"].restore()
    return groups, game, exact


def test_shapley_matches_exact_within_intervals(setup, small):
    _, game, exact = small
    res = estimate_contributions(game, MixedConfig(permutations=48, tolerance=None, seed=3))
    setup["swapper"].restore()
    assert np.all(np.abs(res.estimate - exact) <= 4 * res.stderr + 1e-12)
    span = game.value((2,) * 4) - game.value((0,) * 4)
    assert res.estimate.sum() == pytest.approx(span, rel=1e-9)  # efficiency, every permutation
    assert exact.sum() == pytest.approx(span, rel=1e-9)


def test_literal_game_matches_exact_shapley(setup, small):
    game = _game(setup, small[0], ladder=False)
    game.memo = small[1].memo  # same assignments, same values
    exact = exact_shapley(game, game.n_players)
    res = estimate_contributions(game, MixedConfig(permutations=48, tolerance=None, seed=4))
    setup["swapper"].restore()
    assert np.all(np.abs(res.estimate - exact.estimate) <= 4 * res.stderr + 1e-12)
    assert res.estimate.sum() == pytest.approx(exact.estimate.sum(), rel=1e-9)


def test_adaptive_stop_and_budget(setup, small):
    _, game, _ = small
    res = estimate_contributions(game, MixedConfig(permutations=200, tolerance=10.0, seed=0))
    assert res.stop_reason == "tolerance" and res.permutations == 8
    assert np.all(1.96 * res.stderr < 10.0 * abs(game.value((2,) * 4) - game.value((0,) * 4)))
    capped = estimate_contributions(game, MixedConfig(permutations=200, tolerance=None,
                                                      max_evaluations=40, seed=0))
    assert capped.stop_reason == "max_evaluations" and capped.evaluations <= 40


def test_milp_matches_bruteforce_groups_and_budget(setup):
    s = setup
    game = _game(s)
    res = estimate_contributions(game, MixedConfig(permutations=2, min_permutations=2,
                                                   tolerance=None))
    s["swapper"].restore()
    scores = choice_scores(res.estimate, len(s["groups"]), len(s["specs"]))
    assert all(sc[0] == 0.0 for sc in scores)
    costs = group_costs(s["cost"], s["groups"], s["specs"])
    budget = Budget.parse("avg_bits=4.2")
    limits = budget.layer_limits(s["cost"])
    alloc = allocate_milp(scores, costs, limits)
    best = -np.inf
    for choice in itertools.product(range(3), repeat=len(scores)):
        spent = sum(c[k] for c, k in zip(costs["avg_bits"], choice, strict=True))
        if spent > limits["avg_bits"] + 1e-9:
            continue
        total = sum(sc[k] for sc, k in zip(scores, choice, strict=True))
        if total > best:
            best = total
    assert alloc.score == pytest.approx(best, abs=1e-12)
    # The returned choice itself (not just its reported score) is feasible and optimal; with
    # ties it may differ from the first optimum the enumeration meets.
    spent = sum(c[k] for c, k in zip(costs["avg_bits"], alloc.choice, strict=True))
    got = sum(sc[k] for sc, k in zip(scores, alloc.choice, strict=True))
    assert spent <= limits["avg_bits"] + 1e-9
    assert got == pytest.approx(best, abs=1e-12)
    policy = choice_policy(s["groups"], s["specs"], alloc.choice)
    for layer in (0, 1):
        qkv = {policy.layers[f"model.layers.{layer}.self_attn.{p}_proj"].weight
               for p in "qkv"}
        gate_up = {policy.layers[f"model.layers.{layer}.mlp.{p}_proj"].weight
                   for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    assert all(row["ok"] for row in budget.check(s["cost"], policy))
    assert alloc.binding == ("avg_bits",)


def test_resume_gives_same_allocation(setup, small, tmp_path):
    s, groups = setup, small[0]
    cfg = MixedConfig(permutations=8, tolerance=None, seed=5)
    fp = {"model": "tiny", "groups": groups}
    full = estimate_contributions(small[1], cfg, state_path=tmp_path / "a.json", fingerprint=fp)

    def stop(stage, done, total):
        if done >= 4:
            raise KeyboardInterrupt

    path = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        estimate_contributions(_game(s, groups), cfg, state_path=path, fingerprint=fp,
                               progress=stop)
    saved = json.loads(path.read_text())
    assert len(saved["sampler"]["marginals"]) == 4
    game = _game(s, groups)
    resumed = estimate_contributions(game, cfg, state_path=path, resume=True, fingerprint=fp)
    s["swapper"].restore()
    np.testing.assert_array_equal(resumed.estimate, full.estimate)
    costs = group_costs(s["cost"], groups, s["specs"])
    limits = {"avg_bits": float(sum(c[1] for c in costs["avg_bits"]))}
    pick = [allocate_milp(choice_scores(r.estimate, len(groups), 3), costs, limits).choice
            for r in (full, resumed)]
    assert pick[0] == pick[1]
    with pytest.raises(SmpqError, match="different run"):
        estimate_contributions(_game(s, groups), cfg, state_path=path, resume=True,
                               fingerprint={"model": "other"})


def test_pairwise_milp_matches_bruteforce():
    rng = np.random.default_rng(0)
    n_groups, n_levels = 4, 3
    phi = rng.uniform(0, 1, n_groups * (n_levels - 1))
    a = rng.normal(size=(8, 8))
    k = 0.5 * (a @ a.T) / 8 + 0.5 * np.diag(np.diag(a @ a.T) / 8)
    k[0, 3] = k[3, 0] = -0.2  # a rewarded pair too
    costs = {"avg_bits": [np.array([2.0, 4.0, 8.0]) * w for w in (0.1, 0.2, 0.3, 0.4)]}
    for lim in (3.0, 4.5, 6.0):
        alloc = allocate_quadratic(phi, k, costs, {"avg_bits": lim}, risk=0.7)
        best = max(pairwise_value(c, phi, k, n_levels, 0.7)
                   for c in itertools.product(range(n_levels), repeat=n_groups)
                   if sum(cc[i] for cc, i in zip(costs["avg_bits"], c, strict=True)) <= lim + 1e-12)
        assert alloc.score == pytest.approx(best, abs=1e-9)
        assert alloc.costs["avg_bits"] <= lim + 1e-9


def test_interaction_matrix_shrinks_to_diagonal(setup, small):
    _, game, _ = small
    res = estimate_contributions(game, MixedConfig(permutations=8, tolerance=None))
    sigma = np.cov(res.marginals, rowvar=False)
    k = interaction_matrix(res, 0.5)
    np.testing.assert_allclose(np.diag(k), np.diag(sigma))
    np.testing.assert_allclose(k - np.diag(np.diag(k)), 0.5 * (sigma - np.diag(np.diag(sigma))))


# ----------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def baselines(setup):
    s = setup
    s["swapper"].restore()
    batches = list(s["blocks"].split(2))
    stats = collect_input_stats(s["model"], list(s["linears"]), batches,
                                lambda m, b: m(input_ids=b, use_cache=False))
    moments, n = gradient_moments(s["model"], s["linears"], list(s["blocks"].split(1)), lm_loss)
    out = {m: baseline_scores(m, s["linears"], s["groups"], s["cands"], stats=stats,
                              moments=moments, n_grad_batches=n)
           for m in ("hessian", "fisher", "gradxdw", "relerr")}
    return out, stats, moments


@pytest.mark.parametrize("method", ["hessian", "fisher", "gradxdw", "relerr"])
def test_baseline_more_bits_scores_higher(baselines, method):
    res = baselines[0][method]
    for sc in res.scores:
        assert np.all(np.diff(sc) > 0), (method, sc)


def _inputs(s, name):
    seen = []
    handle = s["model"].get_submodule(name).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        s["model"](input_ids=s["blocks"], use_cache=False)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_hessian_and_relerr_equal_direct_output_error(setup, baselines):
    s, res = setup, baselines[0]
    name = "model.layers.1.mlp.down_proj"
    x = _inputs(s, name).double()
    w = s["linears"][name].weight.detach().double()
    for k, key in enumerate(s["cands"].keys):
        dw = s["cands"].weights[name][key].double() - w
        direct = float(output_error_from_inputs(dw, x))
        assert res["hessian"].errors[name][k] == pytest.approx(direct, rel=1e-6)
        rel = w.numel() * (direct / float(output_error_from_inputs(w, x))) ** 0.5
        assert res["relerr"].errors[name][k] == pytest.approx(rel, rel=1e-6)


def test_fisher_and_gradxdw_equal_direct_gradients(setup, baselines):
    s, res = setup, baselines[0]
    name = "model.layers.0.self_attn.v_proj"
    weight = s["linears"][name].weight
    grads = []
    for b in s["blocks"].split(1):
        s["model"].zero_grad(set_to_none=True)
        lm_loss(s["model"], b).backward()
        grads.append(weight.grad.detach().double().clone())
    s["model"].zero_grad(set_to_none=True)
    fisher = torch.stack(grads).square().mean(0)
    mean = torch.stack(grads).mean(0)
    for k, key in enumerate(s["cands"].keys):
        dw = s["cands"].weights[name][key].double() - weight.detach().double()
        assert res["fisher"].errors[name][k] == pytest.approx(
            float((fisher * dw.square()).sum()), rel=1e-6)
        assert res["gradxdw"].errors[name][k] == pytest.approx(
            float((mean * dw).abs().sum()), rel=1e-6)


def test_uniform_choice_picks_highest_fitting(setup):
    s = setup
    costs = group_costs(s["cost"], s["groups"], s["specs"])
    for text, level in (("avg_bits=2", 0), ("avg_bits=7.9", 1), ("avg_bits=8", 2)):
        limits = Budget.parse(text).layer_limits(s["cost"])
        assert uniform_choice(costs, limits) == (level,) * len(s["groups"])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text", ["int9g32", "foo", "int4g32,int4g32", "int4", "fp4_e2m1-asym",
                                  "fp5_e2m2g32,int4"])
def test_bad_candidates(text):
    with pytest.raises(SmpqError):
        parse_candidates(text)


def test_candidate_strings_round_trip():
    specs = parse_candidates("int8,fp4_e2m1g32,int4g128-sym,int2g32,int3t")
    assert [s.bits for s in specs] == [2, 3, 4, 4, 8]
    assert parse_candidates([spec_key(s) for s in specs]) == specs
    assert not specs[0].symmetric and specs[3].symmetric


def test_bad_backend_method_and_budget(setup):
    s = setup
    with pytest.raises(SmpqError, match="backend"):
        build_candidates(s["linears"], s["specs"], "nope")
    with pytest.raises(SmpqError, match="method"):
        baseline_scores("nope", s["linears"], s["groups"], s["cands"])
    with pytest.raises(SmpqError, match="Hessian"):
        baseline_scores("hessian", s["linears"], s["groups"], s["cands"])
    costs = group_costs(s["cost"], s["groups"], s["specs"])
    limits = Budget.parse("avg_bits=1.5").layer_limits(s["cost"])
    scores = [np.arange(3.0)] * len(s["groups"])
    with pytest.raises(SmpqError, match="infeasible"):
        allocate_milp(scores, costs, limits)
    with pytest.raises(SmpqError, match="infeasible"):
        uniform_choice(costs, limits)
    with pytest.raises(SmpqError, match="infeasible"):
        allocate_quadratic(np.zeros(16), np.eye(16), costs, limits)


def test_same_answer_as_allocate_bruteforce(setup):
    s = setup
    costs = group_costs(s["cost"], s["groups"][:5], s["specs"])
    rng = np.random.default_rng(1)
    scores = [np.cumsum(rng.uniform(0, 1, 3)) for _ in range(5)]
    limits = {"size": float(sum(c[1] for c in costs["size"]))}
    a = allocate_milp(scores, costs, limits)
    b = allocate_bruteforce(scores, costs, limits)
    assert a.choice == b.choice


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(_config()).save_pretrained(str(folder))
    ByteTokenizer().save(folder)
    return folder


SMALL = RunSettings(block=32, calib_blocks=4, val_blocks=4, test_blocks=4,
                    shapley=MixedConfig(permutations=4, tolerance=None))


def test_run_ptq_end_to_end_and_resume(model_dir, tmp_path):
    out, settings = tmp_path / "run", replace(SMALL, cache_dir=str(tmp_path / "cache"))
    first = run_ptq(str(model_dir), "avg_bits=3.5", "gptq", "shapley", out, CANDS, seed=1,
                    settings=settings)
    for name in ("policy.json", "contributions.json", "summary.json", "model.safetensors",
                 "quant_meta.json", "shapley_state.json", "exports/EXPORTS.md"):
        assert (out / name).is_file(), name
    assert all(row["ok"] for row in first["budget_check"])
    contrib = json.loads((out / "contributions.json").read_text())
    assert len(contrib["players"]) == 16 and len(contrib["groups"]) == 8
    assert {"estimate", "stderr", "ci95", "samples"} <= set(contrib["players"][0])
    policy = Policy.load(out / "policy.json")
    loaded = load_quantized(out, transformers.LlamaForCausalLM(_config()).eval())
    cached = [load_file(str(f))["weight"]
              for f in (tmp_path / "cache" / "candidates").glob("*.safetensors")]
    for name in policy.layers:  # every packed weight is one of the cached candidates
        w = loaded.get_submodule(name).weight.data
        assert any(c.shape == w.shape and torch.equal(w, c) for c in cached), name
    again = run_ptq(str(model_dir), "avg_bits=3.5", "gptq", "shapley", out, CANDS, seed=1,
                    resume=True, settings=settings)
    assert Policy.load(out / "policy.json").layers == policy.layers
    assert again["candidates_built"] == 0 and again["search_cost"]["forward_passes"] == 0
    assert again["metrics"] == first["metrics"]


def test_ptq_command_and_bad_inputs(model_dir, tmp_path):
    text = ptq_command(str(model_dir), "avg_bits=3", "rtn", "hessian", str(tmp_path / "h"),
                       candidates=CANDS)
    assert "test perplexity" in text and "hessian" in text
    for kwargs, match in (({"method": "nope"}, "method"), ({"backend": "nope"}, "backend"),
                          ({"budget": "avg_bits=1"}, "infeasible"),
                          ({"candidates": "int4g32"}, "two candidate")):
        args = {"model": str(model_dir), "budget": "avg_bits=3", "backend": "rtn",
                "method": "hessian", "out": tmp_path / "bad", "candidates": CANDS} | kwargs
        with pytest.raises(SmpqError, match=match):
            run_ptq(**args, settings=SMALL)
