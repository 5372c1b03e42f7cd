"""The MILP allocator against the brute-force oracle, and the budget helpers around it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smpq.alloc import (
    Allocation,
    FeasibleCount,
    allocate_bruteforce,
    allocate_milp,
    cheapest,
    count_feasible,
    most_expensive,
    pareto_front,
)
from smpq.errors import SmpqError


def random_instance(rng: np.random.Generator, integer: bool):
    """2-6 layers, 1-5 choices, 1-3 metrics, limits between cheapest and most expensive."""
    sizes = [int(rng.integers(1, 6)) for _ in range(int(rng.integers(2, 7)))]
    if integer:  # small integers: many ties in score and cost
        scores = [rng.integers(0, 3, k).astype(float) for k in sizes]
        costs = {f"m{i}": [rng.integers(0, 4, k).astype(float) for k in sizes] for i in range(3)}
    else:
        scale = 10 ** rng.uniform(-4, 4)
        scores = [rng.normal(size=k) * scale for k in sizes]
        costs = {
            f"m{i}": [rng.uniform(0, 1, k) * 10 ** rng.uniform(0, 9) for k in sizes]
            for i in range(3)
        }
    costs = dict(list(costs.items())[: int(rng.integers(1, 4))])
    low, high = cheapest(costs), most_expensive(costs)
    limits = {m: low[m] + rng.uniform(0, 1) * (high[m] - low[m]) for m in costs}
    return scores, costs, limits


def brute_count(costs, limits) -> int:
    sizes = [len(a) for a in next(iter(costs.values()))]
    return sum(
        all(sum(costs[m][i][k] for i, k in enumerate(choice)) <= lim for m, lim in limits.items())
        for choice in itertools.product(*(range(k) for k in sizes))
    )


def assert_same_optimum(scores, costs, limits) -> None:
    try:
        oracle = allocate_bruteforce(scores, costs, limits)
    except SmpqError as exc:
        with pytest.raises(SmpqError) as got:
            allocate_milp(scores, costs, limits)
        assert str(got.value) == str(exc)
        return
    found = allocate_milp(scores, costs, limits)
    spread = sum(float(np.ptp(s)) for s in scores)
    assert found.score == pytest.approx(oracle.score, rel=0, abs=1e-9 * spread + 1e-12)
    assert found.score == pytest.approx(
        sum(s[k] for s, k in zip(scores, found.choice, strict=True))
    )
    high = most_expensive(costs)
    for m, lim in limits.items():
        assert found.costs[m] <= lim + 1e-9 * max(abs(lim), high[m])
    assert found.binding == oracle.binding
    assert found.status == "optimal"


@pytest.mark.parametrize("seed", range(120))
def test_milp_matches_bruteforce(seed):
    rng = np.random.default_rng(seed)
    assert_same_optimum(*random_instance(rng, integer=seed % 2 == 0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 4)),
            min_size=1,
            max_size=5,
        ),
        min_size=2,
        max_size=6,
    ),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_milp_matches_bruteforce_with_ties(layers, f0, f1):
    scores = [np.array([c[0] for c in layer], float) for layer in layers]
    costs = {
        "bitops": [np.array([c[1] for c in layer], float) for layer in layers],
        "size": [np.array([c[2] for c in layer], float) for layer in layers],
    }
    low, high = cheapest(costs), most_expensive(costs)
    limits = {
        "bitops": low["bitops"] + f0 * (high["bitops"] - low["bitops"]),
        "size": low["size"] + f1 * (high["size"] - low["size"]),
    }
    assert_same_optimum(scores, costs, limits)


# ---------------------------------------------------------------- hand-built examples


def three_layers():
    """Each layer: low (0) or high (1) precision; high scores 1 more."""
    scores = [np.array([0.0, 1.0])] * 3
    costs = {
        "bitops": [np.array([1.0, 4.0])] * 3,
        "size": [np.array([1.0, 2.0])] * 3,
        "wbits": [np.array([3.0, 5.0])] * 3,
    }
    return scores, costs


def test_binding_and_tight_on_known_example():
    scores, costs = three_layers()
    # bitops 6 allows one high layer; size 5.5 would allow two; wbits is only reported.
    alloc = allocate_milp(scores, costs, {"bitops": 6.0, "size": 5.5})
    assert isinstance(alloc, Allocation)
    assert alloc.score == 1.0
    assert sorted(alloc.choice) == [0, 0, 1]
    assert alloc.costs == {"bitops": 6.0, "size": 4.0, "wbits": 11.0}
    assert alloc.slack == {"bitops": 0.0, "size": 1.5}
    assert alloc.binding == ("bitops",)
    assert alloc.tight == ("bitops",)
    assert alloc.status == "optimal"
    assert alloc.seconds >= 0


def test_limits_at_or_above_most_expensive_never_bind():
    scores, costs = three_layers()
    alloc = allocate_milp(scores, costs, {"bitops": 100.0, "size": 5.5})
    assert sorted(alloc.choice) == [0, 1, 1]
    assert alloc.binding == ("size",)
    alloc = allocate_milp(scores, costs, {"bitops": 12.0})
    assert alloc.choice == (1, 1, 1)
    assert alloc.slack == {"bitops": 0.0}
    assert alloc.binding == ()
    assert alloc.tight == ()  # slack 0, but no layer has a costlier choice left to move to


def test_tight_but_not_binding():
    # The costlier choice scores worse: the budget is full, but lifting it gains nothing.
    scores = [np.array([1.0, 0.0])]
    costs = {"bitops": [np.array([1.0, 2.0])]}
    alloc = allocate_milp(scores, costs, {"bitops": 1.5})
    assert alloc.choice == (0,)
    assert alloc.tight == ("bitops",)
    assert alloc.binding == ()


def test_redundant_pair_neither_binds_alone():
    # Two limits that each allow exactly one high layer: dropping either changes nothing.
    scores, costs = three_layers()
    alloc = allocate_milp(scores, costs, {"bitops": 6.0, "size": 4.5})
    assert alloc.score == 1.0
    assert alloc.binding == ()
    assert set(alloc.tight) == {"bitops", "size"}


def test_infeasible_names_cheapest_reachable():
    scores, costs = three_layers()
    with pytest.raises(SmpqError, match=r"bitops limit 2 is below the cheapest reachable 3"):
        allocate_milp(scores, costs, {"bitops": 2.0, "size": 10.0})
    with pytest.raises(SmpqError) as exc:
        allocate_bruteforce(scores, costs, {"bitops": 2.0, "size": 2.5})
    assert "bitops limit 2 is below the cheapest reachable 3" in str(exc.value)
    assert "size limit 2.5 is below the cheapest reachable 3" in str(exc.value)
    # Exactly at the cheapest is feasible.
    assert allocate_milp(scores, costs, {"bitops": 3.0}).choice == (0, 0, 0)


def test_jointly_infeasible_message():
    # Each layer is either cheap in bitops or cheap in size, never both.
    scores = [np.array([0.0, 0.0])] * 2
    costs = {"bitops": [np.array([0.0, 10.0])] * 2, "size": [np.array([10.0, 0.0])] * 2}
    limits = {"bitops": 5.0, "size": 5.0}
    for allocate in (allocate_milp, allocate_bruteforce):
        with pytest.raises(SmpqError, match="reachable on its own.*no policy meets all"):
            allocate(scores, costs, limits)


def test_unlimited_metrics_and_no_limits():
    scores = [np.array([0.2, 0.9, 0.1]), np.array([3.0])]
    costs = {"bitops": [np.array([1.0, 2.0, 3.0]), np.array([5.0])]}
    alloc = allocate_milp(scores, costs, {})
    assert alloc.choice == (1, 0)
    assert alloc.costs == {"bitops": 7.0}
    assert alloc.limits == alloc.slack == {}
    assert alloc.binding == alloc.tight == ()


def test_milp_rejects_policies_over_the_limit_within_solver_tolerance():
    # Both high layers exceed the limit by 2e-8 relative: inside HiGHS's feasibility
    # tolerance, outside ours (1e-9), so the first MILP answer must be cut off and re-solved.
    scores = [np.array([0.0, 1.0])] * 2
    costs = {"bitops": [np.array([0.0, 0.5 + 1e-8])] * 2}
    alloc = allocate_milp(scores, costs, {"bitops": 1.0})
    assert alloc.score == 1.0
    assert alloc.costs["bitops"] <= 1.0
    assert alloc.binding == ("bitops",)


def test_time_limit_must_be_positive():
    with pytest.raises(SmpqError, match="time limit"):
        allocate_milp([np.zeros(2)], {"bitops": [np.ones(2)]}, {"bitops": 1.0}, time_limit=0)


def test_bruteforce_refuses_huge_enumeration():
    scores = [np.zeros(2)] * 22
    costs = {"bitops": [np.ones(2)] * 22}
    with pytest.raises(SmpqError, match="brute force would enumerate"):
        allocate_bruteforce(scores, costs, {"bitops": 30.0})


def test_milp_handles_a_realistic_size_quickly():
    rng = np.random.default_rng(0)
    bits = np.array([(w, a) for w in range(2, 9) for a in range(2, 9)])
    macs = rng.integers(10**5, 10**8, 24)
    params = rng.integers(10**3, 10**6, 24)
    scores = [-(rng.uniform(0.1, 10) * 4.0 ** -bits[:, 0] + 4.0 ** -bits[:, 1]) for _ in macs]
    costs = {
        "bitops": [m * bits[:, 0] * bits[:, 1] * 1.0 for m in macs],
        "size": [p * bits[:, 0] * 1.0 for p in params],
    }
    low, high = cheapest(costs), most_expensive(costs)
    limits = {m: low[m] + 0.3 * (high[m] - low[m]) for m in costs}
    alloc = allocate_milp(scores, costs, limits, time_limit=30)
    assert alloc.status == "optimal"
    assert all(alloc.slack[m] >= -1e-9 * limits[m] for m in limits)


# ---------------------------------------------------------------- validation


GOOD_SCORES = [np.array([0.0, 1.0]), np.array([2.0])]
GOOD_COSTS = {"bitops": [np.array([1.0, 2.0]), np.array([3.0])]}


@pytest.mark.parametrize(
    ("scores", "costs", "limits", "match"),
    [
        ([], GOOD_COSTS, {}, "scores has no layers"),
        ([np.array([]), np.array([1.0])], GOOD_COSTS, {}, "scores layer 0 must be a non-empty"),
        ([np.zeros((2, 2)), np.array([1.0])], GOOD_COSTS, {}, "1-D"),
        ([np.array([0.0, np.nan]), np.array([1.0])], GOOD_COSTS, {}, "non-finite"),
        (GOOD_SCORES, {"bitops": [np.array([1.0, 2.0])]}, {}, "has 1 layers, expected 2"),
        (GOOD_SCORES, {"bitops": [np.array([1.0]), np.array([3.0])]}, {}, "has 1 choices, exp"),
        (GOOD_SCORES, {"bitops": [np.array([1.0, np.inf]), np.array([3.0])]}, {}, "non-finite"),
        (GOOD_SCORES, {"bitops": [["a", "b"], [1.0]]}, {}, "not numeric"),
        (GOOD_SCORES, GOOD_COSTS, {"size": 3.0}, "limit for 'size' has no costs"),
        (GOOD_SCORES, GOOD_COSTS, {"bitops": math.nan}, "finite number"),
        (GOOD_SCORES, GOOD_COSTS, {"bitops": "many"}, "must be a number"),
        ("0.5", GOOD_COSTS, {}, "one array per layer"),
        (GOOD_SCORES, [1, 2], {}, "costs must map"),
    ],
)
def test_malformed_inputs(scores, costs, limits, match):
    for allocate in (allocate_milp, allocate_bruteforce):
        with pytest.raises(SmpqError, match=match):
            allocate(scores, costs, limits)


def test_cheapest_and_most_expensive():
    costs = {
        "bitops": [np.array([3.0, 1.0]), np.array([2.0, 5.0, 4.0])],
        "size": [[1, 1], [0, 0, 9]],
    }
    assert cheapest(costs) == {"bitops": 3.0, "size": 1.0}
    assert most_expensive(costs) == {"bitops": 8.0, "size": 10.0}
    with pytest.raises(SmpqError):
        cheapest({"bitops": [np.array([1.0]), np.array([])]})


# ---------------------------------------------------------------- counting


@pytest.mark.parametrize("seed", range(12))
def test_count_feasible_exact_dp_matches_brute_count(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, int(rng.integers(2, 7)))
    step = int(rng.integers(1, 50))
    costs = {"bitops": [rng.integers(0, 20, k) * step + 1000.0 for k in sizes]}
    low, high = cheapest(costs), most_expensive(costs)
    limits = {
        "bitops": float(
            np.round(low["bitops"] + rng.uniform(0, 1) * (high["bitops"] - low["bitops"]))
        )
    }
    got = count_feasible(costs, limits, max_enumerate=0)  # forces the DP path
    assert got.exact
    assert 10**got.log10 == pytest.approx(brute_count(costs, limits), rel=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_count_feasible_enumeration_matches_brute_count(seed):
    rng = np.random.default_rng(100 + seed)
    _, costs, limits = random_instance(rng, integer=seed % 2 == 0)
    got = count_feasible(costs, limits)
    assert got.exact
    expected = brute_count(costs, limits)
    assert got.log10 == pytest.approx(math.log10(expected) if expected else -math.inf)


@pytest.mark.parametrize("seed", range(6))
def test_count_feasible_sampling_is_close(seed):
    rng = np.random.default_rng(200 + seed)
    sizes = [5] * 7
    costs = {
        "bitops": [rng.uniform(1, 10, k) for k in sizes],
        "size": [rng.uniform(1, 10, k) for k in sizes],
    }
    low, high = cheapest(costs), most_expensive(costs)
    limits = {m: low[m] + 0.45 * (high[m] - low[m]) for m in costs}
    got = count_feasible(costs, limits, max_enumerate=0, samples=20_000, seed=seed)
    assert not got.exact
    truth = count_feasible(costs, limits)
    assert truth.exact
    assert 0 < got.rel_stderr < 0.05
    assert abs(10 ** (got.log10 - truth.log10) - 1) < 5 * got.rel_stderr + 0.01


def test_count_feasible_sampling_single_float_metric():
    rng = np.random.default_rng(7)
    costs = {"size": [rng.uniform(0, 1, 4) for _ in range(8)]}
    limits = {"size": cheapest(costs)["size"] + 1.3}
    got = count_feasible(costs, limits, max_enumerate=0)
    truth = count_feasible(costs, limits)
    assert truth.exact and not got.exact
    assert abs(10 ** (got.log10 - truth.log10) - 1) < 5 * got.rel_stderr + 0.01


def test_count_feasible_edge_cases():
    costs = {"bitops": [np.array([1.0, 2.0, 3.0])] * 4}
    assert count_feasible(costs, {}) == FeasibleCount(4 * math.log10(3), True)
    assert count_feasible(costs, {"bitops": 100.0}) == FeasibleCount(4 * math.log10(3), True)
    assert count_feasible(costs, {"bitops": 3.0}) == FeasibleCount(-math.inf, True)
    assert count_feasible(costs, {"bitops": 4.0}) == FeasibleCount(0.0, True)
    assert count_feasible(costs, {"bitops": 5.0}).log10 == pytest.approx(math.log10(5))
    with pytest.raises(SmpqError, match="at least one cost metric"):
        count_feasible({}, {})


def test_count_feasible_large_integer_network_is_exact():
    # 60 layers x 8 weight bits: 8^60 policies, far beyond enumeration, counted exactly by DP.
    costs = {"wbits": [np.arange(1, 9) * 1000.0] * 60}
    got = count_feasible(costs, {"wbits": 60 * 1000.0 * 2})
    # Each layer pays w-1 >= 0 extra units; total extra <= 60: C(60 + 60, 60) minus overflows.
    extra = [np.arange(8)] * 60
    ways = np.zeros(61)
    ways[0] = 1
    for e in extra:
        new = np.zeros(61)
        for v in e:
            new[v:] += ways[: 61 - v]
        ways = new
    assert got.exact
    assert got.log10 == pytest.approx(math.log10(ways.sum()), abs=1e-9)


# ---------------------------------------------------------------- pareto


def test_pareto_front():
    points = [(1.0, 5.0), (2.0, 5.0), (0.5, 1.0), (2.0, 7.0), (3.0, 9.0), (0.5, 1.0), (0.4, 2.0)]
    assert pareto_front(points).tolist() == [2, 1, 4]
    assert pareto_front(np.zeros((0, 2))).tolist() == []
    with pytest.raises(SmpqError):
        pareto_front([1.0, 2.0, 3.0])
    with pytest.raises(SmpqError):
        pareto_front([(1.0, math.nan)])
