"""Baseline strategies against independent references: exact Hessians, brute force, ptq."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.func import functional_call

from smpq.apply import quantizable_layers
from smpq.cnn.data import get_splits
from smpq.cnn.models import MLP
from smpq.cnn.pipeline import calibration_batches, default_pinned, ptq
from smpq.cnn.search.baselines import (
    HutchinsonConfig,
    PolicyTable,
    greedy,
    hawq,
    interaction_analysis,
    oat_sensitivity,
    one_at_a_time,
    oracle,
    random_search,
    uniform,
)
from smpq.cnn.search.harness import PolicyEvaluator, SearchSpace, cost_tables
from smpq.cnn.search.hawq import hutchinson_traces
from smpq.cnn.search.oracle import enumerate_feasible, sample_feasible
from smpq.cnn.train import TrainConfig, evaluate, train
from smpq.cost import Budget, trace_costs
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import act_spec, weight_spec

BITS = (2, 3, 4, 8)
W_SPECS = [weight_spec(b) for b in BITS]
A_SPECS = [act_spec(b) for b in BITS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    """An MLP with 5 linear layers (3 searched) trained for one epoch on digits."""
    splits = get_splits("digits")
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(32, 24, 24, 16))
    train(model, splits.train, TrainConfig(epochs=1, seed=0))
    model.eval()
    names = list(quantizable_layers(model))
    cost = trace_costs(model, splits.train[0][0][None])
    return {"model": model, "splits": splits, "cost": cost, "fixed": default_pinned(names),
            "calib": calibration_batches(splits.train, seed=0)}


def ptq_eval(task, policy: Policy) -> tuple[float, float]:
    """The independent path: quantize a copy, calibrate, evaluate on validation."""
    q = ptq(task["model"], policy, task["calib"])
    return evaluate(q, task["splits"].val)


def is_feasible(task, budget: Budget, policy: Policy) -> bool:
    return all(r["ok"] for r in budget.check(task["cost"], policy, task["fixed"]))


def between(task, frac: float) -> Budget:
    """BitOps `frac` of the way from the cheapest policy (all 2/2) to uniform 3/3."""
    cost, fixed = task["cost"], task["fixed"]
    low, high = (cost.metrics(Policy.uniform(cost.names, b, b, pinned=fixed))["bitops"]
                 for b in (2, 3))
    return Budget.parse(f"bitops={low + frac * (high - low):.1f}")


# -- Hutchinson ------------------------------------------------------------------------------

def test_hutchinson_matches_exact_hessian_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    cfg = HutchinsonConfig(tol=1e-9, min_iters=8, max_iters=400, seed=1)
    est = hutchinson_traces(model, [(x, y)], ["0", "2"], cfg)

    def loss_of(name):
        return lambda w: F.cross_entropy(functional_call(model, {f"{name}.weight": w}, (x,)), y)

    exact_w = [torch.autograd.functional.hessian(loss_of(n), getattr(model, n).weight)
               for n in ("0", "2")]
    exact_w = [float(h.reshape(h.shape[0] * h.shape[1], -1).trace()) for h in exact_w]
    h0 = model[1](model[0](x)).detach()
    in0 = torch.autograd.functional.hessian(lambda z: F.cross_entropy(model(z), y), x)
    in2 = torch.autograd.functional.hessian(lambda z: F.cross_entropy(model[2](z), y), h0)
    exact_a = [float(in0.reshape(x.numel(), -1).trace()), float(in2.reshape(h0.numel(), -1)
                                                                  .trace())]
    assert est.iterations == 400 and not est.converged
    for got, se, want in zip([*est.weight, *est.act], [*est.weight_stderr, *est.act_stderr],
                             exact_w + exact_a, strict=True):
        assert se > 0
        assert abs(got - want) < 4 * se, (got, want, se)


def test_hutchinson_stops_when_precise_enough():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    est = hutchinson_traces(model, [(x, y)], ["0", "2"],
                            HutchinsonConfig(tol=0.3, min_iters=4, max_iters=500))
    assert est.converged and est.iterations < 500
    rel = np.concatenate([est.weight_stderr / np.abs(est.weight),
                          est.act_stderr / np.abs(est.act)])
    assert np.all(rel < 0.3)


def test_hawq_is_feasible_and_ranks_low_bits_as_sensitive(task):
    budget = Budget.parse("bitops=uniform:3/3")
    res = hawq(task["model"], task["cost"], budget, task["splits"].train, None, W_SPECS,
               A_SPECS, task["fixed"], cfg=HutchinsonConfig(max_iters=16, n_samples=256))
    assert is_feasible(task, budget, res.policy)
    assert res.evaluations == 0 and res.seconds > 0
    for table in res.info["sensitivity"].values():
        for kind in ("w", "a"):
            s = np.asarray(table[kind])
            assert np.all(np.isfinite(s))
            if s[0] > 0:  # positive trace: error and so sensitivity shrink with more bits
                assert np.all(np.diff(s) <= 1e-12)


# -- uniform -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["bitops=uniform:3/3", "bitops=0.975*uniform:3/3",
                                  "bitops=uniform:4/4", "avg_bits=6",
                                  "size=0.95*uniform:4/4", "bitops=uniform:4/4,avg_bits=6"])
def test_uniform_picks_the_most_expensive_feasible_pair(task, text):
    cost, fixed, budget = task["cost"], task["fixed"], Budget.parse(text)
    rows = []
    for w, a in itertools.product(BITS, BITS):
        pol = Policy.uniform(cost.names, w, a, pinned=fixed)
        got = cost.metrics(pol)
        lim = budget.limits(cost, fixed)
        if all(got[m] <= v * (1 + 1e-9) for m, v in lim.items()):
            rows.append((sum(got[m] / v for m, v in lim.items()), w, a))
    top = max(r[0] for r in rows)
    want = max((r for r in rows if r[0] >= top * (1 - 1e-9)),
               key=lambda r: (-abs(r[1] - r[2]), r[1], r[2]))
    res = uniform(cost, budget, BITS, BITS, fixed)
    assert (res.info["w_bits"], res.info["a_bits"]) == want[1:]
    assert res.policy.layers[cost.names[0]] == fixed[cost.names[0]]


def test_infeasible_budget_raises_everywhere(task):
    m, cost, fixed, s = task["model"], task["cost"], task["fixed"], task["splits"]
    budget = Budget.parse("bitops=1")
    with pytest.raises(SmpqError, match="cheapest"):
        uniform(cost, budget, BITS, BITS, fixed)
    calls = [
        lambda: hawq(m, cost, budget, s.train, s.val, W_SPECS, A_SPECS, fixed,
                     cfg=HutchinsonConfig(max_iters=2, min_iters=2)),
        lambda: greedy(m, cost, budget, s.train, s.val, W_SPECS, A_SPECS, fixed),
        lambda: random_search(m, cost, budget, s.train, s.val, W_SPECS, A_SPECS, fixed),
        lambda: oracle(m, cost, budget, s.train, s.val, W_SPECS, A_SPECS, fixed),
    ]
    for call in calls:
        with pytest.raises(SmpqError, match="infeasible"):
            call()


# -- evaluation path ---------------------------------------------------------------------------

def test_policy_value_equals_ptq_evaluate(task):
    space = SearchSpace.build(task["cost"], W_SPECS, A_SPECS, task["fixed"])
    ev = PolicyEvaluator(task["model"], space, task["splits"].train, task["splits"].val)
    for choice in [(0, 5, 15), (10, 3, 6)]:
        acc, loss = ptq_eval(task, space.policy(choice))
        assert ev.value(choice, "acc") == pytest.approx(acc, abs=1e-6)
        assert ev.value(choice, "neg_loss") == pytest.approx(-loss, rel=1e-5)
    calls = ev.calls
    ev.value((0, 5, 15), "acc")  # memoised
    assert ev.calls == calls == 4


def test_one_at_a_time_drops_match_ptq(task):
    s = task["splits"]
    sens = oat_sensitivity(task["model"], task["cost"], s.train, s.val, W_SPECS, A_SPECS,
                           task["fixed"], reference="low", low=(3, 3))
    names = list(sens.drops)
    assert sens.cost.evaluations == 1 + len(names) * (len(BITS) - 1) * 2
    space = SearchSpace.build(task["cost"], W_SPECS, A_SPECS, task["fixed"])
    ref = [space.pair(1, 1)] * len(names)
    _, ref_loss = ptq_eval(task, space.policy(ref))
    for layer, kind, idx in [(0, "w", 0), (2, "a", 0), (1, "w", 3)]:
        moved = list(ref)
        moved[layer] = space.pair(idx, 1) if kind == "w" else space.pair(1, idx)
        _, loss = ptq_eval(task, space.policy(moved))
        dw, da = sens.drops[names[layer]]
        got = dw[idx] if kind == "w" else da[idx]
        assert got == pytest.approx(loss - ref_loss, abs=1e-5)
    assert sens.drops[names[0]][0][1] == 0.0  # the reference itself


@pytest.mark.parametrize("reference", ["high", "low"])
def test_one_at_a_time_allocation_is_feasible(task, reference):
    s, budget = task["splits"], Budget.parse("bitops=uniform:3/3")
    res = one_at_a_time(task["model"], task["cost"], budget, s.train, s.val, W_SPECS, A_SPECS,
                        task["fixed"], reference=reference, val_samples=120)
    assert is_feasible(task, budget, res.policy)
    assert res.evaluations == 1 + 3 * 6 and 0 < res.forward_seconds < res.seconds


@pytest.mark.parametrize("mode", ["table", "measured"])
def test_greedy_meets_the_budget(task, mode):
    s, budget = task["splits"], between(task, 0.5)
    res = greedy(task["model"], task["cost"], budget, s.train, s.val, W_SPECS, A_SPECS,
                 task["fixed"], mode=mode, val_samples=120)
    assert is_feasible(task, budget, res.policy)
    assert res.info["steps"] and res.evaluations > 0
    # one step earlier the walk was still over budget
    assert not is_feasible(task, budget, _undo_last(task, res))


def _undo_last(task, res) -> Policy:
    """The greedy walk's policy one step before the end (BITS is sorted: index = rank)."""
    space = SearchSpace.build(task["cost"], W_SPECS, A_SPECS, task["fixed"])
    choice = list(space.choice_of(res.policy))
    last = res.info["steps"][-1]
    li = space.names.index(last["layer"])
    i, j = space.split(choice[li])
    assert (BITS[i], BITS[j]) == (last["w_bits"], last["a_bits"])
    choice[li] = space.pair(i + 1, j) if last["kind"] == "w" else space.pair(i, j + 1)
    return space.policy(choice)


# -- random search and oracle ------------------------------------------------------------------

def test_sample_feasible_is_uniform(task):
    space = SearchSpace.build(task["cost"], W_SPECS[:2], A_SPECS[:2], task["fixed"])
    tables = cost_tables(space, task["cost"], between(task, 0.4))
    feasible = {tuple(c) for c in enumerate_feasible(tables).tolist()}
    assert 1 < len(feasible) < 4**3
    draws = sample_feasible(tables, 20_000, np.random.default_rng(0))
    assert tables.feasible(draws).all()
    keys, counts = np.unique(draws, axis=0, return_counts=True)
    assert {tuple(k) for k in keys.tolist()} == feasible
    assert stats.chisquare(counts).pvalue > 1e-4


def test_random_search_is_feasible_and_within_its_evaluations(task):
    s, budget = task["splits"], between(task, 0.6)
    res = random_search(task["model"], task["cost"], budget, s.train, s.val, W_SPECS, A_SPECS,
                        task["fixed"], n_evaluations=7, val_samples=120, seed=3)
    assert is_feasible(task, budget, res.policy)
    assert res.evaluations == res.info["scored"] == 7


def test_oracle_equals_brute_force(task):
    s, budget = task["splits"], Budget.parse("bitops=uniform:3/3")
    w, a = [weight_spec(2), weight_spec(4)], [act_spec(2), act_spec(4)]
    res = oracle(task["model"], task["cost"], budget, s.train, s.val, w, a, task["fixed"],
                 metric="neg_loss")
    table = PolicyTable.from_dict(res.info["table"])
    space = SearchSpace.build(task["cost"], w, a, task["fixed"])
    brute = {}
    for choice in itertools.product(range(4), repeat=3):
        pol = space.policy(choice)
        if is_feasible(task, budget, pol):
            brute[choice] = -ptq_eval(task, pol)[1]
    assert {tuple(c) for c in table.choices.tolist()} == set(brute)
    assert res.evaluations == len(brute)
    for c, v in zip(table.choices.tolist(), table.values, strict=True):
        assert v == pytest.approx(brute[tuple(c)], rel=1e-5)
        assert is_feasible(task, budget, space.policy(c))
    assert res.info["best_value"] == pytest.approx(max(brute.values()), rel=1e-5)
    assert space.choice_of(res.policy) == tuple(table.choices[res.info["best_row"]])


def test_oracle_refuses_a_large_space(task):
    s = task["splits"]
    with pytest.raises(SmpqError, match="limit"):
        oracle(task["model"], task["cost"], None, s.train, s.val, W_SPECS, A_SPECS,
               task["fixed"], max_policies=100)


# -- interaction analysis ----------------------------------------------------------------------

def synthetic_table(interaction: float) -> PolicyTable:
    rng = np.random.default_rng(0)
    layers, k = 4, 3
    choices = np.array(list(itertools.product(range(k), repeat=layers)))
    effects = rng.normal(size=(layers, k))
    values = effects[np.arange(layers), choices].sum(axis=1)
    values += interaction * ((choices[:, 0] == 0) & (choices[:, 1] == 0))
    return PolicyTable(tuple(f"l{i}" for i in range(layers)), ("a", "b", "c"), choices, values)


def test_interactions_additive_table_is_fully_additive():
    rep = interaction_analysis(synthetic_table(0.0))
    assert rep.additive.r2_all == pytest.approx(1.0, abs=1e-9)
    assert rep.additive.r2_test == pytest.approx(1.0, abs=1e-9)
    assert rep.interaction_share == pytest.approx(0.0, abs=1e-6)


def test_interactions_detects_a_pairwise_term():
    rep = interaction_analysis(synthetic_table(5.0))
    assert rep.additive.r2_all < 0.9
    assert rep.pairwise.r2_all == pytest.approx(1.0, abs=1e-6)
    assert rep.interaction_share > 0.1
    assert rep.to_dict()["pairwise"]["n_features"] == 1 + 4 * 3 + 6 * 9
