"""Baselines of the default allocator: aging evolution and CLADO, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import bitops_ladder_space
from smpq import strategy
from smpq.cnn.search.evolution import aging_evolution, clado, clado_objective, mutate
from smpq.cost import Budget, trace_costs
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.spec import act_spec, weight_spec
from smpq.strategy import SearchProblem


def space_of(n_units: int = 4, levels: int = 3, seed: int = 0, frac: float = 0.5) -> PolicySpace:
    """(weight, activation) ladders per unit with a BitOps-like product cost and one limit."""
    return bitops_ladder_space(n_units, levels, seed, frac)


def all_policies(space: PolicySpace) -> np.ndarray:
    return np.array(list(itertools.product(*(range(space.n_choices(u))
                                             for u in range(space.n_units)))))


def rugged(space: PolicySpace, seed: int = 3):
    """A value with a random table per unit, random pair terms and a three-way term."""
    rng = np.random.default_rng(seed)
    lin = [rng.normal(size=space.n_choices(u)) for u in range(space.n_units)]
    pairs = {(u, v): rng.normal(scale=0.5, size=(space.n_choices(u), space.n_choices(v)))
             for u, v in itertools.combinations(range(space.n_units), 2)}
    tri = rng.normal(size=space.n_choices(0))

    def value(choices: np.ndarray, three: bool = True) -> np.ndarray:
        c = np.atleast_2d(choices)
        out = sum(t[c[:, u]] for u, t in enumerate(lin))
        out = out + sum(q[c[:, u], c[:, v]] for (u, v), q in pairs.items())
        if three:
            out = out + tri[c[:, 0]] * (c[:, 1] == 0) * (c[:, 2] == 0)
        return out

    return value


class Counting:
    """A fake evaluator that records every policy it is asked for."""

    def __init__(self, fn):
        self.fn, self.asked = fn, []

    def __call__(self, choices: np.ndarray) -> np.ndarray:
        self.asked.extend(map(tuple, np.atleast_2d(choices).tolist()))
        return self.fn(choices)


def brute_best(space: PolicySpace, value) -> tuple[tuple[int, ...], float]:
    pol = all_policies(space)
    pol = pol[space.fits(pol)]
    v = value(pol)
    return tuple(pol[int(np.argmax(v))]), float(v.max())


# ----------------------------------------------------------------------------- evolution


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutation_always_yields_a_feasible_policy(seed):
    space = space_of(5, 3, seed, frac=0.3)
    rng = np.random.default_rng(seed)
    pol = all_policies(space)
    parents = pol[space.fits(pol)]
    for parent in parents[rng.choice(len(parents), 40)]:
        for _ in range(10):
            child = mutate(space, parent, rng)
            assert child is not None and space.fits(child)[0]
            assert not np.array_equal(child, parent)


def smooth(space: PolicySpace, seed: int):
    """Concave gains per ladder level and a penalty when two ladders both sit at the bottom."""
    g = np.random.default_rng(seed).uniform(0.2, 1, size=(space.n_units, 2))

    def value(choices: np.ndarray) -> np.ndarray:
        lv = space.levels(np.atleast_2d(choices)).reshape(-1, space.n_units, 2)
        return (np.sqrt(lv) * g[None]).sum((1, 2)) - 0.3 * (lv[:, 0, 0] == 0) * (lv[:, 1, 1] == 0)

    return value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evolution_finds_the_brute_force_optimum_within_its_budget(seed):
    space = space_of(4, 3, seed, frac=0.45)
    value = smooth(space, seed)
    best, vbest = brute_best(space, value)
    n_feasible = int(space.fits(all_policies(space)).sum())
    budget = n_feasible // 2
    ev = Counting(value)
    res = aging_evolution(space, ev, n_evaluations=budget, population=10, sample=3, seed=seed)
    assert len(ev.asked) == len(set(ev.asked)) == res.evaluations <= budget  # no repeats
    assert space.fits(np.array(ev.asked)).all()
    assert res.choice == best and res.value == pytest.approx(vbest)
    assert len(res.history) == res.evaluations
    assert np.all(np.diff(res.history) >= 0)
    assert res.history[-1] == pytest.approx(max(value(np.array(ev.asked))))


def test_evolution_stops_when_the_feasible_set_is_spent():
    space = space_of(3, 2, 0, frac=0.2)
    value = rugged(space, 0)
    n_feasible = int(space.fits(all_policies(space)).sum())
    ev = Counting(value)
    res = aging_evolution(space, ev, n_evaluations=n_feasible + 50, population=4, sample=2)
    assert res.evaluations == n_feasible == len(set(ev.asked))
    assert res.stopped == "exhausted"
    assert res.choice == brute_best(space, value)[0]


def test_evolution_rejects_bad_settings():
    space = space_of()
    with pytest.raises(SmpqError, match="sample <= population"):
        aging_evolution(space, rugged(space), n_evaluations=10, population=4, sample=5)


# ----------------------------------------------------------------------------- CLADO


def _changed(ref: np.ndarray, c: np.ndarray) -> list[int]:
    return [u for u in range(len(ref)) if c[u] != ref[u]]


@pytest.mark.parametrize("pair_moves", [2, 8])
def test_clado_objective_reproduces_every_measured_policy(pair_moves):
    space = space_of(4, 3, 1)
    value = rugged(space, 5)  # with a three-way term: the objective is exact only where measured
    ev = Counting(value)
    obj, facts = clado_objective(space, ev, n_evaluations=None, pair_moves=pair_moves)
    asked = np.array(ev.asked)
    assert facts["evaluations"] == len(asked) == len(set(ev.asked))
    n = space.n_choices(0)
    assert facts["singles"] == 4 * (n - 1)
    assert facts["pairs"] == 6 * min(pair_moves, n - 1) ** 2
    ref = space.richest()
    assert tuple(asked[0]) == tuple(ref)
    assert all(len(_changed(ref, c)) in (1, 2) for c in asked[1:])
    bound = obj.bind(None)
    got = np.array([bound.value(c) for c in asked])
    np.testing.assert_allclose(got, value(asked), rtol=0, atol=1e-9)


def test_clado_with_every_pair_is_the_planted_pairwise_value_and_its_optimum():
    space = space_of(4, 3, 2, frac=0.4)
    value = rugged(space, 7)
    pairwise = lambda c: value(c, three=False)  # noqa: E731
    res = clado(space, pairwise, n_evaluations=None, pair_moves=8)
    bound = res.objective.bind(None)
    pol = all_policies(space)
    obj_all = np.array([bound.value(c) for c in pol])
    np.testing.assert_allclose(obj_all, pairwise(pol), atol=1e-9)
    ok = space.fits(pol)
    assert res.choice == tuple(pol[ok][int(np.argmax(obj_all[ok]))])
    assert res.choice == brute_best(space, pairwise)[0]
    assert res.predicted == pytest.approx(obj_all[ok].max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clado_allocation_is_the_brute_force_optimum_of_its_objective(seed):
    space = space_of(5, 3, seed, frac=0.35)
    res = clado(space, rugged(space, seed), n_evaluations=120, pair_moves=3, seed=seed)
    assert res.pair_moves == 2  # 1 + 40 singles + 10 layer pairs x 9 > 120; x 4 fits
    assert res.evaluations == 81
    bound = res.objective.bind(None)
    pol = all_policies(space)
    pol = pol[space.fits(pol)]
    vals = np.array([bound.value(c) for c in pol])
    assert res.predicted == pytest.approx(vals.max(), abs=1e-9)
    assert bound.value(res.choice) == pytest.approx(vals.max(), abs=1e-9)


def test_clado_caps_layer_pairs_and_refuses_a_budget_below_its_singles():
    space = space_of(5, 3, 0)
    res = clado(space, rugged(space), n_evaluations=45, pair_moves=3)
    assert res.evaluations == 45 and res.layer_pairs == 4 and res.pair_moves == 0
    with pytest.raises(SmpqError, match="at least 41 evaluations"):
        clado(space, rugged(space), n_evaluations=40)


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("method", ["evolution", "clado"])
def test_strategies_run_through_the_registry_within_budget(tiny, images, method):
    from torch.utils.data import TensorDataset

    cost = trace_costs(tiny, images[:1])
    data = TensorDataset(images, torch.arange(16) % 10)
    problem = SearchProblem(tiny, cost, Budget.parse("bitops=uniform:3/3"),
                            (weight_spec(2), weight_spec(4)), (act_spec(3), act_spec(4)),
                            train=data, val=data, seed=0, options={"n_evaluations": 40})
    res = strategy.get(method, "cnn")(problem)
    assert 1 <= res.evaluations <= 40
    assert all(r["ok"] for r in Budget.parse("bitops=uniform:3/3").check(cost, res.policy, {}))
    assert method in strategy.names("cnn") and method not in strategy.names("cnn",
                                                                          listed_only=True)
