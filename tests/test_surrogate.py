"""Pairwise surrogate checked against planted models and closed-form variance shares."""

from __future__ import annotations

import numpy as np
import pytest

from smpq.errors import SmpqError
from smpq.surrogate import PairwiseSurrogate, holdout_r2, ladder_steps, r2_score


def planted(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.normal()
    a = rng.normal(0, 1, n)
    b = np.triu(rng.normal(0, 1, (n, n)) * (rng.random((n, n)) < 0.4), 1)

    def v(x):
        x = x.astype(float)
        return c + x @ a + np.einsum("bi,ij,bj->b", x, b, x)

    return v, c, a, b


def coalitions(rng, k: int, n: int) -> np.ndarray:
    return rng.random((k, n)) < 0.5


def test_recovers_a_planted_pairwise_game_exactly():
    n = 10
    v, c, a, b = planted(n)
    rng = np.random.default_rng(1)
    x = coalitions(rng, 400, n)
    g = PairwiseSurrogate.for_game(n, ridge=1e-10)
    assert holdout_r2(g, x, v(x), rng) > 1 - 1e-8
    g.fit(x, v(x))
    assert g.intercept == pytest.approx(c, abs=1e-6)
    np.testing.assert_allclose(g.main, a, atol=1e-6)
    np.testing.assert_allclose(g.pair, b[g.pairs[:, 0], g.pairs[:, 1]], atol=1e-6)
    # closed-form Shapley value of a pairwise game: a_i + sum_j b_ij / 2
    np.testing.assert_allclose(g.shapley(), a + (b + b.T).sum(1) / 2, atol=1e-6)
    top = g.top_interactions(1)[0]
    i, j = np.unravel_index(np.argmax(np.abs(b)), b.shape)
    assert (top[0], top[1]) == (i, j) and top[2] == pytest.approx(b[i, j], abs=1e-6)
    heat = g.unit_interactions()
    np.testing.assert_allclose(heat, np.abs(b + b.T), atol=1e-6)


def test_additive_r2_equals_the_additive_variance_share():
    # x_i iid Bernoulli(1/2), x = (1 + s) / 2: the pure interaction part is sum b_ij s_i s_j / 4
    n = 8
    v, _, a, b = planted(n, seed=4)
    lin = a / 2 + (b + b.T).sum(1) / 4
    share = np.sum(lin**2) / (np.sum(lin**2) + np.sum(b**2) / 16)
    rng = np.random.default_rng(2)
    x = coalitions(rng, 6000, n)
    r2 = holdout_r2(PairwiseSurrogate.for_game(n, pairwise=False, ridge=1e-10), x, v(x), rng)
    assert 0.2 < share < 0.95
    assert r2 == pytest.approx(share, abs=0.03)
    full = holdout_r2(PairwiseSurrogate.for_game(n, ridge=1e-10), x, v(x), rng)
    assert full > 1 - 1e-8


def test_fixed_main_effects_are_kept_and_pairs_recovered():
    n = 9
    v, c, a, b = planted(n, seed=2)
    phi = a + (b + b.T).sum(1) / 2
    x = coalitions(np.random.default_rng(3), 300, n)
    g = PairwiseSurrogate.for_game(n, ridge=1e-10).fit(x, v(x), main=phi)
    np.testing.assert_allclose(g.shapley(), phi, atol=1e-12)
    np.testing.assert_allclose(g.pair, b[g.pairs[:, 0], g.pairs[:, 1]], atol=1e-6)
    # a wrong fixed main effect costs fit quality; as a prior the data can override it
    wrong = phi + 0.5
    bad = PairwiseSurrogate.for_game(n, ridge=1e-10).fit(x, v(x), main=wrong)
    np.testing.assert_allclose(bad.shapley(), wrong, atol=1e-12)
    assert bad.r2(x, v(x)) < 0.999
    soft = PairwiseSurrogate.for_game(n, ridge=1e-10).fit(x, v(x), main=wrong, main_mode="prior",
                                                           prior_weight=1e-8)
    assert soft.r2(x, v(x)) > 1 - 1e-6


def test_ladder_steps_and_a_planted_ladder_model():
    levels = [3, 4, 2]
    choices = np.array([[0, 0, 0], [2, 3, 1], [1, 2, 0]])
    expect = np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(ladder_steps(choices, levels), expect)
    g = PairwiseSurrogate.for_ladders(levels, ridge=1e-10)
    assert g.n_features == 6
    assert not any(g.units[p] == g.units[q] for p, q in g.pairs)  # no pairs within a unit
    rng = np.random.default_rng(0)
    x = ladder_steps(np.column_stack([rng.integers(0, lv, 500) for lv in levels]), levels)
    coef = rng.normal(0, 1, len(g.pairs))
    y = 0.3 + x @ np.arange(6.0) + (x[:, g.pairs[:, 0]] * x[:, g.pairs[:, 1]]) @ coef
    g.fit(x, y)
    np.testing.assert_allclose(g.pair, coef, atol=1e-6)
    assert g.r2(x, y) == pytest.approx(1.0, abs=1e-9)
    assert g.unit_interactions().shape == (3, 3)


def test_r2_score_reference_values():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert r2_score(y, y) == 1.0
    assert r2_score(y, np.full(4, 2.5)) == pytest.approx(0.0)
    assert np.isnan(r2_score(y[:1], y[:1]))


def test_bad_input_is_a_user_error():
    g = PairwiseSurrogate.for_game(4)
    with pytest.raises(SmpqError):
        g.predict(np.zeros((1, 4), bool))
    with pytest.raises(SmpqError):
        g.fit(np.zeros((3, 5), bool), np.zeros(3))
    with pytest.raises(SmpqError):
        g.fit(np.zeros((3, 4), bool), np.zeros(3), main=np.zeros(3))
    with pytest.raises(SmpqError):
        ladder_steps(np.array([[3, 0]]), [3, 2])
    with pytest.raises(SmpqError):
        PairwiseSurrogate.for_ladders([1, 3])
    with pytest.raises(SmpqError):
        PairwiseSurrogate([0, 1], pairs=np.array([[0, 0]]))
