"""The allocation engine: policy space, surrogate, exact top-K and the loop, vs brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from conftest import bitops_ladder_space
from smpq.engine.loop import EngineConfig, run_engine
from smpq.engine.model import fit_model
from smpq.engine.solve import quadratic_topk, quadratic_value
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError


def cnn_like(n_units: int = 4, levels: int = 3, seed: int = 0, frac: float = 0.6) -> PolicySpace:
    """Units with (weight, activation) ladders and a BitOps-like product cost."""
    return bitops_ladder_space(n_units, levels, seed, frac)


def planted(space: PolicySpace, seed: int = 1):
    """A value with per-step effects and deficit-pair interactions (the surrogate's family)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.1, 1.0, len(space.players))
    pairs = np.array(list(itertools.combinations(range(len(space.dims)), 2)))
    beta = -rng.uniform(0, 0.6, len(pairs))

    def value(choices: np.ndarray) -> np.ndarray:
        lv = space.levels(choices)
        steps = np.array([k for _, _, k in space.players])
        main = (lv[:, space.player_dim] >= steps).astype(float) @ a
        d = (space.tops - lv) / space.tops
        return main + (d[:, pairs[:, 0]] * d[:, pairs[:, 1]]) @ beta

    return value


def all_policies(space: PolicySpace) -> np.ndarray:
    return np.array(list(itertools.product(*(range(space.n_choices(u))
                                             for u in range(space.n_units)))))


# ----------------------------------------------------------------------------- space


def test_levels_round_trip_and_pair_convention():
    sp = cnn_like(3, 4)
    pol = all_policies(sp)[::37]
    assert np.array_equal(sp.from_levels(sp.levels(pol)), pol)
    # choice i * n_act + j is (weight level i, activation level j), as SearchSpace.pair
    lv = sp.levels(np.array([[1 * 4 + 3, 0, 15]]))[0]
    assert lv.tolist() == [1, 3, 0, 0, 3, 3]


def test_totals_and_fits_match_a_hand_sum():
    sp = cnn_like(3, 3)
    pol = all_policies(sp)
    hand = np.array([sum(sp.costs["bitops"][u][c] for u, c in enumerate(p)) for p in pol])
    assert np.allclose(sp.totals(pol)["bitops"], hand)
    assert np.array_equal(sp.fits(pol), hand <= sp.limits["bitops"] * (1 + 1e-12))


def test_random_maximal_is_feasible_and_maximal():
    sp = cnn_like(4, 3)
    got = sp.random_maximal(np.random.default_rng(0), 20)
    assert sp.fits(got).all()
    for c in got:
        lv = sp.levels(c)[0]
        for j in range(len(sp.dims)):
            if lv[j] < sp.tops[j]:
                up = lv.copy()
                up[j] += 1
                assert not sp.fits(sp.from_levels(up))[0]


def test_random_ladder_comes_in_mirrored_pairs():
    sp = cnn_like(3, 4)
    lv = sp.levels(sp.random_ladder(np.random.default_rng(3), 10))
    assert np.array_equal(lv[0::2] + lv[1::2], np.broadcast_to(sp.tops, lv[0::2].shape))


def test_space_rejects_bad_input():
    with pytest.raises(SmpqError, match="no units"):
        PolicySpace((), (), {})
    with pytest.raises(SmpqError, match="one cost per choice"):
        PolicySpace(("a",), ((2, 2),), {"size": (np.zeros(3),)})
    sp = cnn_like(2, 3)
    with pytest.raises(SmpqError, match="budget infeasible"):
        sp.with_limits({"bitops": 1.0}).check_feasible()


# ----------------------------------------------------------------------------- surrogate


def _ladder_shapley_by_enumeration(space: PolicySpace, value) -> np.ndarray:
    """Average marginal of each step over every order of the players (count semantics)."""
    n = len(space.players)
    phi = np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        lv = np.zeros(len(space.dims), dtype=np.int64)
        prev = value(space.from_levels(lv))[0]
        for p in order:
            j = space.player_dim[p]
            lv[j] += 1
            cur = value(space.from_levels(lv))[0]
            step = next(i for i, (u, d, k) in enumerate(space.players)
                        if space.dims.index((u, d)) == j and k == lv[j])
            phi[step] += cur - prev
            prev = cur
    return phi / len(orders)


def test_model_recovers_a_planted_game_and_its_shapley_values():
    sp = PolicySpace(("a", "b", "c"), ((3,), (3,), (2,)),
                     {"size": (np.arange(3.0), np.arange(3.0), np.arange(2.0))})
    value = planted(sp, seed=4)
    pol = all_policies(sp)
    m = fit_model(sp, pol, value(pol))
    assert np.allclose(m.predict(sp, pol), value(pol), atol=1e-3)
    exact = _ladder_shapley_by_enumeration(sp, value)  # 5 players, 120 orders
    assert np.allclose(m.shapley(sp), exact, atol=2e-3)
    assert math.isclose(m.shapley(sp).sum(), float(value(pol[-1:])[0] - value(pol[:1])[0]),
                        abs_tol=2e-3)


def test_choice_tables_reproduce_the_model():
    sp = cnn_like(4, 3)
    value = planted(sp)
    pol = sp.random_ladder(np.random.default_rng(0), 60)
    m = fit_model(sp, pol, value(pol))
    lin, quad = m.choice_tables(sp)
    test = all_policies(sp)[::97]
    assert np.allclose(quadratic_value(lin, quad, test) + m.intercept, m.predict(sp, test))


def test_additive_game_prefers_the_additive_fit():
    sp = cnn_like(4, 3)
    rng = np.random.default_rng(0)
    w = rng.uniform(0, 1, len(sp.players))
    steps = np.array([k for _, _, k in sp.players])

    def value(c):
        return (sp.levels(c)[:, sp.player_dim] >= steps).astype(float) @ w

    pol = sp.random_ladder(rng, 40)
    m = fit_model(sp, pol, value(pol))
    assert m.pair_scale == 0.0 and np.all(m.beta == 0)
    assert m.r2_cv > 0.99


# ----------------------------------------------------------------------------- exact top-K


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_topk_matches_brute_force(seed):
    sp = cnn_like(3, 3, seed=seed, frac=0.5)
    rng = np.random.default_rng(seed)
    lin = [rng.normal(size=sp.n_choices(u)) for u in range(sp.n_units)]
    quad = {(0, 1): rng.normal(size=(9, 9)), (1, 2): rng.normal(size=(9, 9)),
            (0, 2): rng.normal(size=(9, 9))}
    pol = all_policies(sp)
    pol = pol[sp.fits(pol)]
    vals = np.sort(quadratic_value(lin, quad, pol))[::-1]
    got = quadratic_topk(sp, lin, quad, k=4)
    assert len(set(got)) == 4 and sp.fits(np.array(got)).all()
    assert np.allclose(quadratic_value(lin, quad, np.array(got)), vals[:4], atol=1e-7)
    # excluding the best returns the runner-up first
    again = quadratic_topk(sp, lin, quad, k=1, exclude=got[:1])
    assert np.isclose(quadratic_value(lin, quad, np.array(again))[0], vals[1], atol=1e-7)


def test_quadratic_topk_rejects_k_below_one():
    sp = cnn_like(2, 2)
    with pytest.raises(SmpqError, match="k must be"):
        quadratic_topk(sp, [np.zeros(4), np.zeros(4)], {}, k=0)


# ----------------------------------------------------------------------------- the loop


def test_engine_finds_the_optimum_of_a_planted_game_with_few_evaluations():
    sp = cnn_like(4, 3, seed=2, frac=0.45)
    value = planted(sp, seed=5)
    pol = all_policies(sp)  # 9^4 = 6,561 policies
    feas = pol[sp.fits(pol)]
    best = value(feas).max()
    res = run_engine(sp, value, EngineConfig(evaluations=60, seed=0))
    assert res.evaluations <= 60
    assert math.isclose(res.value, best, abs_tol=1e-9)
    assert sp.fits(np.array(res.choice))[0]
    assert res.history[-1] == res.value and all(np.diff(res.history) >= 0)
    assert res.rounds and "predicted" in res.rounds[0]


def test_engine_returns_the_best_policy_it_evaluated():
    sp = cnn_like(4, 3, seed=3)
    rng = np.random.default_rng(0)
    table = {}
    seen = []

    def noisy(choices):
        out = []
        for c in np.atleast_2d(choices):
            key = tuple(c)
            table.setdefault(key, float(rng.normal()))
            seen.append(key)
            out.append(table[key])
        return np.array(out)

    res = run_engine(sp, noisy, EngineConfig(evaluations=30, seed=1))
    feasible = [k for k in seen if sp.fits(np.array(k))[0]]
    assert res.value == max(table[k] for k in feasible)
    assert len(seen) == len(set(seen)) == res.evaluations  # never evaluates a policy twice


def test_engine_resumes_after_a_kill_and_reaches_the_same_policy(tmp_path):
    sp = cnn_like(4, 3, seed=1)
    value = planted(sp, seed=2)
    cfg = EngineConfig(evaluations=40, seed=3)
    full = run_engine(sp, value, cfg)
    calls = {"n": 0}

    def dying(choices):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return value(choices)

    ckpt = tmp_path / "engine.json"
    with pytest.raises(KeyboardInterrupt):
        run_engine(sp, dying, cfg, checkpoint=ckpt)
    resumed = run_engine(sp, value, cfg, checkpoint=ckpt, resume=True)
    assert resumed.choice == full.choice and resumed.evaluations == full.evaluations
    other = EngineConfig(evaluations=40, seed=4)
    with pytest.raises(SmpqError, match="another search"):
        run_engine(sp, value, other, checkpoint=ckpt, resume=True)


@pytest.mark.parametrize("kwargs, match", [({"evaluations": 3}, "below the"),
                                           ({"top_k": 0}, "top_k")])
def test_engine_rejects_bad_settings(kwargs, match):
    sp = cnn_like(2, 2)
    with pytest.raises(SmpqError, match=match):
        run_engine(sp, planted(sp), EngineConfig(**kwargs))


def test_engine_evaluates_initial_policies_first_and_skips_infeasible_ones():
    sp = cnn_like(3, 3, seed=4)
    value = planted(sp)
    seen = []

    def record(choices):
        seen.extend(tuple(int(x) for x in c) for c in np.atleast_2d(choices))
        return value(choices)

    good = tuple(int(x) for x in sp.random_maximal(np.random.default_rng(0), 1)[0])
    bad = tuple(int(x) for x in sp.richest())
    assert not sp.fits(np.array(bad))[0]
    run_engine(sp, record, EngineConfig(evaluations=20, seed=0), initial=np.array([bad, good]))
    assert seen[0] == good and bad not in seen


@pytest.mark.parametrize("r", [1, 2])
def test_trust_region_enumeration_matches_the_region_milp(r):
    from smpq.engine.loop import _region_topk

    sp = cnn_like(3, 3, seed=5, frac=0.6)
    value = planted(sp, seed=6)
    pol = sp.random_ladder(np.random.default_rng(1), 40)
    m = fit_model(sp, pol, value(pol))
    lin, quad = m.choice_tables(sp)
    centre = tuple(int(x) for x in sp.random_maximal(np.random.default_rng(2), 1)[0])
    skip = {centre}
    got = _region_topk(sp, m, centre, r, 3, skip)
    milp = quadratic_topk(sp, lin, quad, k=3, exclude=[centre], near=(centre, r))
    assert np.allclose(quadratic_value(lin, quad, np.array(got)),
                       quadratic_value(lin, quad, np.array(milp)), atol=1e-7)
    assert all(sum(a != b for a, b in zip(c, centre, strict=True)) <= r for c in got)
    assert sp.fits(np.array(got)).all() and centre not in got


# ----------------------------------------------------------------------------- prior feature


def _additive(space: PolicySpace, gains: np.ndarray, b0: float = 0.3):
    steps = np.array([k for _, _, k in space.players])

    def value(choices: np.ndarray) -> np.ndarray:
        lv = space.levels(np.atleast_2d(choices))
        return b0 + (lv[:, space.player_dim] >= steps).astype(float) @ gains

    return value


def test_a_right_prior_predicts_every_policy_from_three_points():
    """True value additive with step gains g, prior = 7 g (right shape, wrong scale). Three
    evaluations pin the scale; the model must then predict all 729 policies exactly, which
    the plain ridge fit (12 main effects from 3 points) cannot."""
    sp = cnn_like(3, 3)
    rng = np.random.default_rng(4)
    gains = rng.uniform(0.05, 1.0, len(sp.players))
    value = _additive(sp, gains)
    pol = all_policies(sp)
    train = pol[rng.choice(len(pol), 3, replace=False)]
    with_prior = fit_model(sp, train, value(train), prior=7.0 * gains)
    plain = fit_model(sp, train, value(train))
    truth = value(pol)
    assert np.max(np.abs(with_prior.predict(sp, pol) - truth)) < 1e-3 * np.ptp(truth)
    assert np.max(np.abs(plain.predict(sp, pol) - truth)) > 0.1 * np.ptp(truth)
    # the folded main effects are the true gains (scale recovered), so the ladder Shapley
    # values of the additive game are exact: phi = gains
    assert np.allclose(with_prior.shapley(sp), gains, atol=1e-3 * gains.max())


def test_the_engine_with_a_right_prior_finds_the_optimum_in_few_evaluations():
    sp = cnn_like(5, 3, seed=2, frac=0.5)
    rng = np.random.default_rng(1)
    gains = rng.uniform(0.05, 1.0, len(sp.players))
    value = _additive(sp, gains)
    pol = all_policies(sp)
    ok = sp.fits(pol)
    best = float(value(pol[ok]).max())  # brute force over 9^5 policies
    res = run_engine(sp, value, EngineConfig(evaluations=12, top_k=2, seed=0, bootstrap=0),
                     prior=gains * 3.0)
    assert res.value == pytest.approx(best, abs=1e-9)


def test_a_prior_of_the_wrong_length_is_refused():
    sp = cnn_like(2, 3)
    pol = all_policies(sp)[:5]
    with pytest.raises(SmpqError, match="one gain per step"):
        fit_model(sp, pol, np.arange(5.0), prior=np.ones(3))
