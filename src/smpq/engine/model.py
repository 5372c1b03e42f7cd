"""A pairwise surrogate of the policy value, fitted to every evaluated policy.

    v(policy) ~ b + sum_p a_p [level(dim_p) >= k_p] + sum_{i<j} beta_ij D_i D_j

Main effects are one coefficient per ladder step (any shape of per-unit response); the
interactions are products of the ladders' deficits D (share of steps missing), so a pair of
ladders costs one coefficient whatever their lengths. Ridge regression; the penalty and the
weight of the interaction block (an additive fit wins when data is scarce) are chosen by
K-fold cross-validation, whose error also gives the held-out R^2.

A prior (`prior`: one expected gain per step, e.g. from Fisher scores) enters as one more
feature, the prior's additive prediction of each policy, scaled so that ridge leaves its
coefficient c practically unpenalised: the main effects become c * prior + a, with a shrunk
to 0, so with few evaluations the model is the cheap score, recalibrated, and data moves it
away only where the measurements disagree.

Ladder Shapley values of the fitted model have a closed form. In the game whose players are
steps and whose coalitions map to levels by counting, step k of ladder i gets its main effect
a_ik plus, for every partner ladder j, beta_ij * (-1/t_i) * E[D_j when i reaches level k],
and E[D_j] = 1 - k/(t_i + 1) (each of j's t_j steps precedes i's k-th step with probability
k/(t_i + 1) in a uniform random order). Bootstrap refits give their standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError

__all__ = ["QuadraticModel", "fit_model", "pair_index"]

LAMBDAS = tuple(10.0 ** (e / 2) for e in range(-6, 7))
PAIR_SCALES = (0.0, 0.5, 1.0)
MAX_PAIRS = 2048
PRIOR_WEIGHT = 1e3  # the prior column's scale: its coefficient's penalty is ~1e-6 of others


def pair_index(space: PolicySpace, window: int | None = None) -> np.ndarray:
    """(n_pairs, 2) ladders whose deficits interact: all pairs, or units within `window`."""
    n = len(space.dims)
    i, j = np.triu_indices(n, k=1)
    if window is not None:
        units = np.array([u for u, _ in space.dims])
        keep = np.abs(units[i] - units[j]) <= window
        i, j = i[keep], j[keep]
    return np.stack([i, j], axis=1)


def _features(space: PolicySpace, choices: np.ndarray, pairs: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray]:
    lv = space.levels(choices)
    steps = np.array([k for _, _, k in space.players])
    main = (lv[:, space.player_dim] >= steps).astype(float)
    d = (space.tops - lv) / np.maximum(space.tops, 1)
    pair = d[:, pairs[:, 0]] * d[:, pairs[:, 1]] if len(pairs) else np.zeros((len(lv), 0))
    return main, pair


class _Ridge:
    """Ridge with an unpenalised intercept; one SVD serves every penalty."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.xm, self.ym = x.mean(axis=0), y.mean()
        xc, self.yc = x - self.xm, y - self.ym
        self.xc = xc
        self.u, self.s, self.vt = np.linalg.svd(xc, full_matrices=False)
        self.uty = self.u.T @ self.yc

    def solve(self, lam: float) -> tuple[np.ndarray, float, float]:
        """Coefficients, intercept and generalised cross-validation score at `lam`."""
        s2 = self.s**2
        coef = self.vt.T @ (self.s / (s2 + lam) * self.uty)
        resid = self.yc - self.xc @ coef
        dof = 1.0 + float(np.sum(s2 / (s2 + lam)))
        n = len(self.yc)
        gcv = float(resid @ resid) / n / max(1.0 - dof / n, 1e-3) ** 2
        return coef, float(self.ym - self.xm @ coef), gcv


@dataclass(frozen=True)
class QuadraticModel:
    """A fitted surrogate: intercept, step main effects, deficit-pair interactions."""

    intercept: float
    main: np.ndarray  # (players,)
    pairs: np.ndarray  # (n_pairs, 2) indices into space.dims
    beta: np.ndarray  # (n_pairs,)
    lam: float
    pair_scale: float
    r2_cv: float
    n_fit: int

    def predict(self, space: PolicySpace, choices: np.ndarray) -> np.ndarray:
        main, pair = _features(space, choices, self.pairs)
        return self.intercept + main @ self.main + pair @ self.beta

    def shapley(self, space: PolicySpace) -> np.ndarray:
        """Ladder Shapley value of every step of the fitted game (closed form)."""
        phi = self.main.copy()
        tops = space.tops.astype(float)
        steps = np.array([k for _, _, k in space.players], dtype=float)
        owner = space.player_dim
        for (i, j), b in zip(self.pairs, self.beta, strict=True):
            for a in (i, j):
                sel = owner == a
                phi[sel] += b * (-1.0 / tops[a]) * (1.0 - steps[sel] / (tops[a] + 1.0))
        return phi

    def choice_tables(self, space: PolicySpace
                      ) -> tuple[list[np.ndarray], dict[tuple[int, int], np.ndarray]]:
        """The model as per-unit choice scores and cross-unit choice-pair matrices.

        Returns `linear[u][c]` and `quad[(u, v)][c, c']` (u < v) such that the model's value
        of a policy is intercept + sum_u linear[u][c_u] + sum_{u<v} quad[(u, v)][c_u, c_v].
        """
        linear = []
        dfc = []  # per unit: (n_choices, n_dims) deficits of each choice
        for u in range(space.n_units):
            choices = np.zeros((space.n_choices(u), space.n_units), dtype=np.int64)
            choices[:, u] = np.arange(space.n_choices(u))
            main, _ = _features(space, choices, np.zeros((0, 2), dtype=np.int64))
            own = np.array([space.dims[p_dim][0] == u for p_dim in space.player_dim])
            linear.append(main[:, own] @ self.main[own])
            dfc.append(space.deficits(choices))
        quad: dict[tuple[int, int], np.ndarray] = {}
        for (i, j), b in zip(self.pairs, self.beta, strict=True):
            if b == 0:
                continue
            u, v = space.dims[i][0], space.dims[j][0]
            if u == v:
                linear[u] = linear[u] + b * dfc[u][:, i] * dfc[u][:, j]
                continue
            if u > v:
                u, v, i, j = v, u, j, i
            m = b * np.outer(dfc[u][:, i], dfc[v][:, j])
            quad[(u, v)] = quad.get((u, v), 0) + m
        return linear, quad

    def dim_labels(self, space: PolicySpace) -> list[str]:
        names = space.dim_names or ()
        return [space.units[u] + (f".{names[d]}" if d < len(names) and names[d] else "")
                for u, d in space.dims]

    def interaction_matrix(self, space: PolicySpace) -> dict:
        """{labels, matrix}: the symmetric ladders x ladders matrix of pair coefficients."""
        n = len(space.dims)
        mat = np.zeros((n, n))
        for (i, j), b in zip(self.pairs, self.beta, strict=True):
            mat[i, j] = mat[j, i] = b
        return {"labels": self.dim_labels(space), "matrix": mat.tolist()}

    def top_interactions(self, space: PolicySpace, n: int = 10) -> list[dict]:
        """The largest |beta| pairs, named by unit and dim."""
        order = np.argsort(-np.abs(self.beta))[:n]
        labels = self.dim_labels(space)
        return [{"a": labels[self.pairs[k][0]], "b": labels[self.pairs[k][1]],
                 "beta": float(self.beta[k])} for k in order if self.beta[k] != 0]


def _design(main: np.ndarray, pair: np.ndarray, scale: float,
            lead: np.ndarray | None = None) -> np.ndarray:
    x = np.hstack([main, pair * scale]) if scale > 0 else main
    return x if lead is None else np.hstack([x, lead[:, None]])


def _prior_column(main: np.ndarray, prior: np.ndarray | None
                  ) -> tuple[np.ndarray | None, float]:
    """(the prior's prediction of each policy, scaled to PRIOR_WEIGHT std; the scale), or
    (None, 0) without a prior or when it predicts every policy alike."""
    if prior is None:
        return None, 0.0
    f = main @ np.asarray(prior, float)
    sd = float(np.std(f))
    if not np.isfinite(sd) or sd <= 1e-12 * (1.0 + float(np.max(np.abs(f)))):
        return None, 0.0
    k = PRIOR_WEIGHT / sd
    return f * k, k


def _cv_error(main: np.ndarray, pair: np.ndarray, y: np.ndarray, scales: tuple,
              lambdas: tuple, folds: int, rng: np.random.Generator,
              lead: np.ndarray | None = None) -> np.ndarray:
    """K-fold squared error of every (pair scale, lambda): (scales, lambdas)."""
    n = len(y)
    idx = rng.permutation(n)
    err = np.zeros((len(scales), len(lambdas)))
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        for a, scale in enumerate(scales):
            x = _design(main, pair, scale, lead)
            ridge = _Ridge(x[train], y[train])
            for b, lm in enumerate(lambdas):
                coef, b0, _ = ridge.solve(lm)
                err[a, b] += float(np.sum((y[test] - b0 - x[test] @ coef) ** 2))
    return err


def fit_model(space: PolicySpace, choices: np.ndarray, values: np.ndarray, *,
              pairs: np.ndarray | None = None, folds: int = 5, seed: int = 0,
              lam: float | None = None, pair_scale: float | None = None,
              prior: np.ndarray | None = None) -> QuadraticModel:
    """Fit the surrogate (`prior`: per-step expected gains, see the module docstring). The
    penalty and the interaction block's weight are chosen by K-fold
    cross-validation (GCV when there are too few points for folds); `lam`/`pair_scale` fixed
    skip the choice (bootstrap refits). `r2_cv` is the chosen model's K-fold R^2."""
    choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
    y = np.asarray(values, dtype=float)
    if len(y) != len(choices) or len(y) < 2:
        raise SmpqError("the surrogate needs at least two evaluated policies")
    if not np.all(np.isfinite(y)):
        raise SmpqError("policy values must be finite")
    if pairs is None:
        pairs = pair_index(space)
        if len(pairs) > MAX_PAIRS:
            pairs = pair_index(space, window=1)
    main, pair = _features(space, choices, pairs)
    if prior is not None and np.shape(prior) != (main.shape[1],):
        raise SmpqError(f"the prior needs one gain per step ({main.shape[1]}), got "
                        f"{np.shape(prior)}")
    lead, k = _prior_column(main, prior)
    scales = tuple(s for s in (PAIR_SCALES if pair_scale is None else (pair_scale,))
                   if s == 0 or len(pairs))
    lambdas = LAMBDAS if lam is None else (lam,)
    rng = np.random.default_rng(seed)
    if len(scales) * len(lambdas) > 1 and len(y) >= 2 * folds:
        err = _cv_error(main, pair, y, scales, lambdas, folds, rng, lead)
        a, b = np.unravel_index(int(np.argmin(err)), err.shape)
        scale, lm = scales[a], lambdas[b]
        ss = float(np.sum((y - y.mean()) ** 2))
        r2 = 1.0 - float(err[a, b]) / ss if ss > 0 else float("nan")
    else:
        best = None
        for s in scales:
            ridge = _Ridge(_design(main, pair, s, lead), y)
            for lm_ in lambdas:
                gcv = ridge.solve(lm_)[2]
                if best is None or gcv < best[0]:
                    best = (gcv, s, lm_)
        _, scale, lm = best
        r2 = float("nan")
    coef, b0, _ = _Ridge(_design(main, pair, scale, lead), y).solve(lm)
    n_main = main.shape[1]
    a = coef[:n_main]
    if lead is not None:  # fold the prior into the main effects: c * prior + a
        a = a + coef[-1] * k * np.asarray(prior, float)
        coef = coef[:-1]
    beta = coef[n_main:] * scale if scale > 0 else np.zeros(len(pairs))
    return QuadraticModel(b0, a, pairs, beta, lm, scale, r2, len(y))


def bootstrap_shapley(space: PolicySpace, choices: np.ndarray, values: np.ndarray,
                      model: QuadraticModel, n_boot: int = 20, seed: int = 0,
                      prior: np.ndarray | None = None) -> np.ndarray:
    """Standard error of the model's Shapley values over bootstrap refits of the data."""
    rng = np.random.default_rng(seed)
    choices = np.atleast_2d(np.asarray(choices))
    values = np.asarray(values, float)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(values), len(values))
        m = fit_model(space, choices[idx], values[idx], pairs=model.pairs, lam=model.lam,
                      pair_scale=model.pair_scale, prior=prior)
        draws.append(m.shapley(space))
    return np.std(draws, axis=0, ddof=1) if n_boot > 1 else np.zeros(len(model.main))
