"""Shapley estimators checked against closed forms and exact enumeration, not their own output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from smpq.errors import SmpqError
from smpq.estimators import kernel_shap, stratified_kernel_shap, stratified_svarm
from smpq.shapley import exact_shapley

ESTIMATORS = [kernel_shap, stratified_kernel_shap, stratified_svarm]


def quadratic(n: int, seed: int = 0):
    """v = a.x + x^T B x / 2 with closed-form phi_i = a_i + sum_j B_ij / 2."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, n)
    b = np.triu(rng.normal(0, 1, (n, n)), 1)
    b = b + b.T

    def v(masks):
        x = masks.astype(float)
        return x @ a + 0.5 * np.einsum("bi,ij,bj->b", x, b, x)

    return v, a + b.sum(axis=1) / 2


def additive(n: int):
    a = np.linspace(-1.0, 2.0, n)
    return (lambda m: m.astype(float) @ a), a


def voting(n: int, seed: int = 0):
    w = np.random.default_rng(seed).integers(1, 10, n)
    q = int(0.55 * w.sum())

    def v(masks):
        return (masks.astype(np.int64) @ w >= q).astype(float)

    return v, None


def glove(n: int):
    """Left gloves 0..k-1, right gloves k..n-1; value = number of matched pairs."""
    k = n // 3

    def v(masks):
        return np.minimum(masks[:, :k].sum(1), masks[:, k:].sum(1)).astype(float)

    return v, None


def collapse(n: int, seed: int = 0):
    """Additive value that drops to 0 below a size threshold, plus a unanimity term."""
    a = np.random.default_rng(seed).uniform(0.2, 1.0, n)
    t = int(0.6 * n)

    def v(masks):
        return (masks @ a) * (masks.sum(1) >= t) + 2.0 * masks[:, :3].all(1)

    return v, None


GAMES = {"additive": additive, "quadratic": quadratic, "voting": voting, "glove": glove,
         "collapse": collapse}


def truth(name: str, n: int):
    v, closed = GAMES[name](n)
    return v, (closed if closed is not None else exact_shapley(v, n).estimate)


def rmse(x, y):
    return float(np.sqrt(np.mean((np.asarray(x) - y) ** 2)))


def test_brute_force_reference_agrees_with_closed_form():
    v, phi = quadratic(5, seed=3)
    orders = list(itertools.permutations(range(5)))
    ref = np.zeros(5)
    for order in orders:
        mask = np.zeros(5, bool)
        for p in order:
            before = v(mask[None])[0]
            mask[p] = True
            ref[p] += v(mask[None])[0] - before
    np.testing.assert_allclose(ref / len(orders), phi, atol=1e-12)


def test_an_antithetic_pair_integrates_order_two_games():
    # why estimators.py has no pairwise control variate on antithetic permutations
    n = 9
    v, phi = quadratic(n, seed=2)
    perm = np.random.default_rng(0).permutation(n)
    mean = np.zeros(n)
    for order in (perm, perm[::-1]):
        mask = np.zeros((1, n), bool)
        for p in order:
            before = v(mask)[0]
            mask[0, p] = True
            mean[p] += (v(mask)[0] - before) / 2
    np.testing.assert_allclose(mean, phi, atol=1e-12)


@pytest.mark.parametrize("est", [kernel_shap, stratified_kernel_shap])
@pytest.mark.parametrize("n", [7, 12])
def test_paired_regressions_are_exact_on_order_two_games(est, n):
    # a coalition and its complement integrate every game of order <= 2 exactly
    v, phi = quadratic(n, seed=n)
    res = est(v, n, 6 * n, np.random.default_rng(1))
    np.testing.assert_allclose(res.estimate, phi, atol=1e-8)


@pytest.mark.parametrize("est", ESTIMATORS)
@pytest.mark.parametrize("name", ["additive", "voting", "glove", "collapse"])
def test_consistent_against_exact(est, name):
    n = 12
    v, phi = truth(name, n)
    res = est(v, n, 3000, np.random.default_rng(0))
    assert res.evaluations <= 3000
    scale = max(float(np.abs(phi).max()), 1e-9)
    assert rmse(res.estimate, phi) < 0.08 * scale
    # the reported stderr is of the right size: errors within 5 stderr (plus float slack)
    assert np.all(np.abs(res.estimate - phi) <= 5 * res.stderr + 1e-9 * scale)


@pytest.mark.parametrize("est", [kernel_shap, stratified_kernel_shap])
@pytest.mark.parametrize("name", ["voting", "collapse", "glove"])
def test_efficiency_holds_exactly(est, name):
    n = 13
    v, _ = GAMES[name](n)
    res = est(v, n, 400, np.random.default_rng(5))
    total = v(np.ones((1, n), bool))[0] - v(np.zeros((1, n), bool))[0]
    assert res.estimate.sum() == pytest.approx(total, abs=1e-10)
    assert res.value_full - res.value_empty == pytest.approx(total)


def test_svarm_is_unbiased_on_average():
    # unbiased once every stratum is hit (a budget of 60 here leaves some empty: biased)
    n = 9
    v, phi = truth("voting", n)
    runs = np.array([stratified_svarm(v, n, 200, np.random.default_rng(s)).estimate
                     for s in range(300)])
    sem = runs.std(axis=0, ddof=1) / np.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(axis=0) - phi) < 4.5 * sem + 1e-12)


@pytest.mark.parametrize("est", ESTIMATORS)
def test_rmse_shrinks_with_budget(est):
    n = 14
    v, phi = truth("collapse", n)
    err = {b: np.mean([rmse(est(v, n, b, np.random.default_rng(s)).estimate, phi)
                       for s in range(6)]) for b in (150, 2400)}
    assert err[2400] < 0.5 * err[150]


@pytest.mark.parametrize("est", ESTIMATORS)
def test_stderr_matches_spread_over_seeds(est):
    n = 10
    v, _ = GAMES["collapse"](n)
    runs = [est(v, n, 300, np.random.default_rng(s)) for s in range(40)]
    spread = np.std([r.estimate for r in runs], axis=0, ddof=1).mean()
    reported = np.mean([r.stderr for r in runs])
    assert 0.5 < reported / spread < 2.0


@pytest.mark.parametrize("est", ESTIMATORS)
def test_seeded_runs_reproduce_and_respect_budget(est):
    n = 11
    v, _ = GAMES["voting"](n)
    a = est(v, n, 250, np.random.default_rng(7))
    b = est(v, n, 250, np.random.default_rng(7))
    np.testing.assert_array_equal(a.estimate, b.estimate)
    assert a.evaluations == b.evaluations <= 250
    calls = []

    def counted(masks):
        calls.append(len(masks))
        return v(masks)

    c = est(counted, n, 250, np.random.default_rng(7))
    assert sum(calls) == c.evaluations  # distinct evaluations only


@pytest.mark.parametrize("est", ESTIMATORS)
def test_bad_input_is_a_user_error(est):
    v, _ = GAMES["additive"](6)
    with pytest.raises(SmpqError):
        est(v, 6, 3, np.random.default_rng(0))
    with pytest.raises(SmpqError):
        est(v, 6.0, 100, np.random.default_rng(0))
