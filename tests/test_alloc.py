"""The shared allocator: top-K and the quadratic objective against brute-force enumeration
written here (independent of the package), and one tolerance for "fits" at every caller."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from smpq.alloc import (
    LinearObjective,
    QuadraticObjective,
    allocate_quadratic,
    allocate_quadratic_bruteforce,
    allocate_topk,
    count_feasible,
    enumerate_feasible,
    sample_feasible,
    uniform_choice,
)
from smpq.cnn.search.derive import derive_budgeted
from smpq.cnn.search.harness import SearchSpace, cost_tables
from smpq.cnn.search.oracle import enumerate_feasible as oracle_enumerate
from smpq.cost import Budget, Constraint, LayerCost, ModelCost
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, act_spec, weight_spec

# ---------------------------------------------------------------------------- references


def allowed(costs, limits, choice) -> bool:
    """The documented rule: total <= limit + 1e-9 max(|limit|, sum of each unit's max |c|)."""
    for m, lim in limits.items():
        got = math.fsum(float(c[k]) for c, k in zip(costs[m], choice, strict=True))
        scale = sum(float(np.max(np.abs(c))) for c in costs[m])
        if got > lim + 1e-9 * max(abs(lim), scale):
            return False
    return True


def linear_value(scores, choice) -> float:
    return math.fsum(float(s[k]) for s, k in zip(scores, choice, strict=True))


def quadratic_value(gains, k_mat, risk, sizes, choice) -> float:
    """gains'q - risk q'Kq, q = [level_u >= k] for k = 1..K_u-1, unit-major (written out)."""
    q = []
    for size, level in zip(sizes, choice, strict=True):
        q += [1.0 if level >= k else 0.0 for k in range(1, size)]
    q = np.array(q)
    return float(gains @ q - risk * q @ k_mat @ q)


def ranked(sizes, costs, limits, value):
    """Every feasible policy with its value, best first."""
    rows = [(value(c), c) for c in itertools.product(*(range(k) for k in sizes))
            if allowed(costs, limits, c)]
    return sorted(rows, key=lambda r: -r[0])


def instance(seed: int, quadratic: bool):
    """3-5 units, 2-4 ladder levels each, two limited metrics (costs rising with the level)."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(2, 5)) for _ in range(int(rng.integers(3, 6)))]
    costs = {m: [np.cumsum(rng.uniform(0.1, 1.0, k)) * 10 ** rng.uniform(0, 3) for k in sizes]
             for m in ("bitops", "size")}
    limits = {}
    for m, layers in costs.items():
        low = sum(float(c.min()) for c in layers)
        high = sum(float(c.max()) for c in layers)
        limits[m] = low + rng.uniform(0.3, 0.8) * (high - low)
    if not quadratic:
        return sizes, [rng.normal(size=k) for k in sizes], costs, limits
    n_q = sum(k - 1 for k in sizes)
    gains = rng.uniform(0, 1, n_q)
    a = rng.normal(size=(n_q, n_q))
    k_mat = 0.5 * (a @ a.T) / n_q
    k_mat[0, n_q - 1] = k_mat[n_q - 1, 0] = -0.3  # one rewarded pair across units
    return sizes, (gains, k_mat, 0.6), costs, limits


# ---------------------------------------------------------------------------- top-K


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quadratic", [False, True])
def test_topk_matches_enumeration(seed, quadratic):
    sizes, obj, costs, limits = instance(seed, quadratic)
    if quadratic:
        gains, k_mat, risk = obj
        objective = QuadraticObjective(gains, k_mat, risk)
        value = lambda c: quadratic_value(gains, k_mat, risk, sizes, c)  # noqa: E731
    else:
        objective = LinearObjective(obj)
        value = lambda c: linear_value(obj, c)  # noqa: E731
    want = ranked(sizes, costs, limits, value)
    k = 7
    got = allocate_topk(objective, costs, limits, k)
    assert len(got) == min(k, len(want))
    choices = [a.choice for a in got]
    assert len(set(choices)) == len(choices)  # distinct
    for a in got:
        assert allowed(costs, limits, a.choice)
        assert a.score == pytest.approx(value(a.choice), abs=1e-9)
    scale = max(abs(v) for v, _ in want) + 1e-12
    np.testing.assert_allclose([a.score for a in got], [v for v, _ in want[:k]],
                               rtol=0, atol=1e-7 * scale)
    brute = allocate_topk(objective, costs, limits, k, bruteforce=True)
    np.testing.assert_allclose([a.score for a in brute], [v for v, _ in want[:k]],
                               rtol=0, atol=1e-9 * scale)


def test_topk_returns_every_feasible_policy_when_k_is_large():
    costs = {"bitops": [np.array([1.0, 2.0, 3.0])] * 3}
    scores = [np.array([0.0, 1.0, 2.0])] * 3
    got = allocate_topk(LinearObjective(scores), costs, {"bitops": 5.0}, 100)
    want = {c for c in itertools.product(range(3), repeat=3) if sum(c) + 3 <= 5}
    assert {a.choice for a in got} == want
    assert [a.score for a in got] == sorted((a.score for a in got), reverse=True)
    with pytest.raises(SmpqError, match="k must be"):
        allocate_topk(LinearObjective(scores), costs, {"bitops": 5.0}, 0)


# ---------------------------------------------------------------------------- quadratic


@pytest.mark.parametrize("seed", range(8))
def test_quadratic_milp_matches_enumeration(seed):
    sizes, (gains, k_mat, risk), costs, limits = instance(100 + seed, True)
    want = ranked(sizes, costs, limits, lambda c: quadratic_value(gains, k_mat, risk, sizes, c))
    got = allocate_quadratic(gains, k_mat, costs, limits, risk)
    scale = max(abs(v) for v, _ in want) + 1e-12
    assert got.score == pytest.approx(want[0][0], abs=1e-7 * scale)
    assert allowed(costs, limits, got.choice)
    brute = allocate_quadratic_bruteforce(gains, k_mat, costs, limits, risk)
    assert brute.score == pytest.approx(want[0][0], abs=1e-12 * scale)
    assert set(got.binding) <= set(limits) and got.binding == brute.binding


def test_quadratic_binding_and_infeasible():
    costs = {"bitops": [np.array([0.0, 1.0, 2.0])] * 2, "size": [np.array([0.0, 1.0, 3.0])] * 2}
    gains = np.ones(4)
    k_mat = np.zeros((4, 4))
    a = allocate_quadratic(gains, k_mat, costs, {"bitops": 2.0, "size": 100.0})
    assert a.score == 2.0 and a.binding == ("bitops",)
    with pytest.raises(SmpqError, match="budget infeasible: bitops limit -1 is below the cheapest"):
        allocate_quadratic(gains, k_mat, costs, {"bitops": -1.0})
    with pytest.raises(SmpqError, match="needs 4 gains"):
        allocate_quadratic(np.ones(3), k_mat, costs, {"bitops": 2.0})


# ---------------------------------------------------------------------------- one tolerance

W, A = (weight_spec(4), weight_spec(8)), (act_spec(4), act_spec(8))


def tiny_cost() -> ModelCost:
    """Three layers and a large constant part (other parameters), so the per-layer limits
    are much smaller than the full ones."""
    layers = {f"l{i}": LayerCost(f"l{i}", "Linear", (8, 16), 128, 8, 128 * (i + 1))
              for i in range(3)}
    return ModelCost(layers, other_params=5000)


@pytest.mark.parametrize("metric", ["bitops", "size"])
@pytest.mark.parametrize(("over", "ok"), [(0.0, True), (5e-10, True), (2e-9, False),
                                           (1e-6, False)])
def test_every_caller_judges_fits_the_same(metric, over, ok):
    """The all-W8/A8 policy P is the most expensive and the best; the limit is P's value
    divided by (1 + over). Budget.check, the resolved budget, the CNN MILP derivation, the
    oracle's cost tables, the feasible counter, sampler and enumerator, and the uniform
    helper must all agree on whether P fits (REL_TOL = 1e-9 of the full limit)."""
    cost = tiny_cost()
    fixed = {"l0": LayerChoice(W[0], A[0])}  # a pinned layer: its cost moves to the right side
    top = Policy({"l0": fixed["l0"], "l1": LayerChoice(W[1], A[1]),
                  "l2": LayerChoice(W[1], A[1])})
    limit = cost.metrics(top)[metric] / (1 + over)
    budget = Budget((Constraint(metric, value=limit),))
    assert budget.check(cost, top, fixed)[0]["ok"] is ok

    space = SearchSpace.build(cost, W, A, fixed)
    resolved = budget.resolve(cost, {n: space.pairs for n in space.names}, fixed, fixed)
    assert resolved.fits(cost, top) is ok

    scores = {n: (np.array([0.0, 1.0]), np.array([0.0, 1.0])) for n in space.names}
    d = derive_budgeted(cost, scores, W, A, budget, fixed, fixed)
    assert (d.policy.layers == top.layers) is ok

    tables = cost_tables(space, cost, budget)
    p_choice = space.choice_of(top)
    assert bool(tables.feasible(np.array([p_choice]))[0]) is ok
    assert (p_choice in set(map(tuple, oracle_enumerate(tables).tolist()))) is ok

    costs, limits, scales = tables.units()
    everything = len(space.names) * math.log10(space.n_pairs)
    counted = count_feasible(costs, limits, scales=scales)
    assert (counted.log10 == pytest.approx(everything)) is ok
    listed = {tuple(c) for c in enumerate_feasible(costs, limits, scales=scales).tolist()}
    assert (p_choice in listed) is ok
    drawn = {tuple(c) for c in sample_feasible(costs, limits, 2000, np.random.default_rng(0),
                                               scales=scales).tolist()}
    assert (p_choice in drawn) is ok  # 1 of 16 policies: 2000 draws miss it with p ~ 1e-56

    assert (uniform_choice(costs, limits, scales=scales) == (3, 3)) is ok  # pair 3 = W8/A8


def test_resolve_once_gives_the_per_layer_limits_and_names_every_unreachable_limit():
    cost = tiny_cost()
    fixed = {"l0": LayerChoice(W[0], A[0])}
    pairs = [LayerChoice(w, a) for w in W for a in A]
    budget = Budget.parse("bitops=uniform:8/8,size=uniform:8/8")
    r = budget.resolve(cost, {"l1": pairs, "l2": pairs}, fixed, fixed)
    full = cost.metrics(Policy.uniform(cost.names, 8, 8, pinned=fixed))
    assert r.limits == {"bitops": full["bitops"], "size": full["size"]}
    pinned_cost = cost.choice_cost("l0", fixed["l0"])
    assert r.unit_limits["bitops"] == pytest.approx(full["bitops"] - pinned_cost["bitops"])
    assert r.unit_limits["size"] == pytest.approx(
        full["size"] - cost.constant_size - pinned_cost["size"])
    tight = Budget((Constraint("bitops", value=10.0), Constraint("size", value=10.0)))
    with pytest.raises(SmpqError, match="budget infeasible: bitops limit .* cheapest reachable"
                                        ".*; size limit .* cheapest reachable"):
        tight.resolve(cost, {"l1": pairs, "l2": pairs}, fixed, fixed)
