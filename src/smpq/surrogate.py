"""A sparse pairwise surrogate of a game or of a ladder policy space, fitted by ridge regression.

    g(x) = c + sum_f a_f x_f + sum_{(f, h) in pairs} b_fh x_f x_h,     x binary features

Features are players of a game (x_i = 1: player i in the coalition) or ladder steps of a policy
space (unit u with ordered levels 0..L_u-1 has steps x_{u,k} = [level_u >= k], k = 1..L_u-1).
Pairs join features of different units only (two steps of one unit multiply into a step).

Why: every evaluated coalition or policy is a data point; a surrogate fitted to all of them
predicts unevaluated ones, shows which pairs of units interact (a heatmap), and serves as a
control variate for Shapley sampling. Treating features as players, g's Shapley value is
closed form: phi_f = a_f + sum_h b_fh / 2. Given main effects ``phi`` (e.g. Shapley values
estimated elsewhere) can be imposed exactly (``main_mode="fixed"``: a = phi - B 1 / 2, only c and
b are fitted) or as a prior (``"prior"``: a penalty ``prior_weight * |a + B 1 / 2 - phi|^2``).

``smpq.cnn.search.interactions`` fits one-hot (not step) models to exhaustive policy tables
and keeps its own code: its R^2 numbers are a published benchmark and its parametrisation
differs, so it is left unchanged rather than rerouted through here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

from smpq.errors import SmpqError

__all__ = ["PairwiseSurrogate", "holdout_r2", "ladder_steps", "r2_score"]


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination; nan with fewer than two points or a constant target."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if len(y) < 2:
        return math.nan
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - pred) ** 2))
    if ss_tot <= 1e-300:
        return 1.0 if ss_res <= 1e-300 else math.nan
    return 1.0 - ss_res / ss_tot


def ladder_steps(choices: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Policies as level indices (n_policies, n_units) -> step features [level_u >= k]."""
    choices = np.asarray(choices, dtype=np.int64)
    levels = [int(x) for x in levels]
    if choices.ndim != 2 or choices.shape[1] != len(levels):
        raise SmpqError(f"choices must have shape (k, {len(levels)}), got {choices.shape}")
    if np.any(choices < 0) or np.any(choices >= np.array(levels)):
        raise SmpqError("a choice is outside its unit's levels")
    cols = [choices[:, u : u + 1] >= np.arange(1, lv)[None, :] for u, lv in enumerate(levels)]
    return np.concatenate(cols, axis=1)


class PairwiseSurrogate:
    """Ridge pairwise model over binary features grouped into units; see the module docstring."""

    def __init__(self, units: Sequence[int], pairs: np.ndarray | None = None,
                 ridge: float = 1e-3) -> None:
        self.units = np.asarray(units, dtype=np.int64)
        if self.units.ndim != 1 or len(self.units) < 1:
            raise SmpqError("units must be a non-empty 1-d sequence (one entry per feature)")
        if not ridge >= 0:
            raise SmpqError(f"ridge must be >= 0, got {ridge}")
        p = len(self.units)
        if pairs is None:
            pairs = np.array([(f, h) for f, h in combinations(range(p), 2)
                              if self.units[f] != self.units[h]], dtype=np.int64).reshape(-1, 2)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if len(pairs) and (pairs.min() < 0 or pairs.max() >= p
                           or np.any(pairs[:, 0] == pairs[:, 1])):
            raise SmpqError("pairs must join two different features in range")
        self.pairs = pairs
        self.ridge = float(ridge)
        self.intercept = 0.0
        self.main = np.zeros(p)
        self.pair = np.zeros(len(pairs))
        self.fitted = False

    @classmethod
    def for_game(cls, n_players: int, pairwise: bool = True,
                 ridge: float = 1e-3) -> PairwiseSurrogate:
        """Players as features, every pair of players (or none: an additive model)."""
        pairs = None if pairwise else np.empty((0, 2), np.int64)
        return cls(np.arange(n_players), pairs, ridge)

    @classmethod
    def for_ladders(cls, levels: Sequence[int], ridge: float = 1e-3) -> PairwiseSurrogate:
        """Step features of units with ``levels[u]`` ordered candidates (see ``ladder_steps``)."""
        if any(int(lv) < 2 for lv in levels):
            raise SmpqError("every unit needs at least two levels")
        return cls(np.repeat(np.arange(len(levels)), [int(lv) - 1 for lv in levels]), None, ridge)

    @property
    def n_features(self) -> int:
        return len(self.units)

    def _x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise SmpqError(f"x must have shape (k, {self.n_features}), got {x.shape}")
        return x

    def _pair_cols(self, x: np.ndarray) -> np.ndarray:
        return x[:, self.pairs[:, 0]] * x[:, self.pairs[:, 1]]

    def _incidence(self) -> np.ndarray:
        """(n_features, n_pairs): half of each pair coefficient goes to each of its features."""
        inc = np.zeros((self.n_features, len(self.pairs)))
        cols = np.arange(len(self.pairs))
        inc[self.pairs[:, 0], cols] = inc[self.pairs[:, 1], cols] = 0.5
        return inc

    def fit(self, x: np.ndarray, y: np.ndarray, main: np.ndarray | None = None,
            main_mode: str = "fixed", prior_weight: float = 1.0) -> PairwiseSurrogate:
        """Ridge fit (intercept unpenalised); ``main`` fixes or anchors g's Shapley values."""
        x, y = self._x(x), np.asarray(y, dtype=float).reshape(-1)
        if len(y) != len(x) or len(y) < 1 or not np.all(np.isfinite(y)):
            raise SmpqError("y must hold one finite value per row of x")
        if main_mode not in ("fixed", "prior"):
            raise SmpqError(f"main_mode must be 'fixed' or 'prior', got {main_mode!r}")
        w = self._pair_cols(x)
        if main is None:
            beta = self._ridge(np.hstack([x, w]), y)
            self.main, self.pair = beta[1 : 1 + x.shape[1]], beta[1 + x.shape[1] :]
        else:
            phi = np.asarray(main, dtype=float).reshape(-1)
            if phi.shape != (self.n_features,):
                raise SmpqError(f"main must have {self.n_features} entries, got {phi.shape}")
            inc = self._incidence()
            if main_mode == "fixed":  # a = phi - inc b: fit y - x phi on w - x inc
                beta = self._ridge(w - x @ inc, y - x @ phi)
                self.pair = beta[1:]
                self.main = phi - inc @ self.pair
            else:
                if not prior_weight > 0:
                    raise SmpqError(f"prior_weight must be > 0, got {prior_weight}")
                con = np.hstack([np.eye(self.n_features), inc])
                beta = self._ridge(np.hstack([x, w]), y, con, phi, prior_weight)
                self.main, self.pair = beta[1 : 1 + x.shape[1]], beta[1 + x.shape[1] :]
        self.intercept = float(beta[0])
        self.fitted = True
        return self

    def _ridge(self, f: np.ndarray, y: np.ndarray, con: np.ndarray | None = None,
               target: np.ndarray | None = None, weight: float = 0.0) -> np.ndarray:
        """[intercept, coefficients] minimising |y - c - f beta|^2 + lam |beta|^2 (+ prior)."""
        mu_f, mu_y = f.mean(axis=0), float(y.mean())
        fc, yc = f - mu_f, y - mu_y
        k = f.shape[1]
        scale = max(float(np.sum(fc * fc)) / max(k, 1), 1e-12)
        lam = self.ridge * scale
        if k == 0:
            return np.array([mu_y])
        if con is None and len(y) < k and lam > 0:  # dual: an (m, m) system instead of (k, k)
            beta = fc.T @ np.linalg.solve(fc @ fc.T + lam * np.eye(len(y)), yc)
        else:
            gram = fc.T @ fc + lam * np.eye(k)
            rhs = fc.T @ yc
            if con is not None:
                wt = weight * scale
                gram += wt * con.T @ con
                rhs += wt * con.T @ target
            try:
                beta = np.linalg.solve(gram, rhs)
            except np.linalg.LinAlgError:
                beta = np.linalg.lstsq(gram, rhs, rcond=None)[0]
        return np.concatenate([[mu_y - mu_f @ beta], beta])

    def predict(self, x: np.ndarray) -> np.ndarray:
        if not self.fitted:
            raise SmpqError("fit the surrogate before predicting")
        x = self._x(x)
        return self.intercept + x @ self.main + self._pair_cols(x) @ self.pair

    def r2(self, x: np.ndarray, y: np.ndarray) -> float:
        return r2_score(y, self.predict(x))

    def shapley(self) -> np.ndarray:
        """g's Shapley value with features as players: a_f + sum_h b_fh / 2."""
        return self.main + self._incidence() @ self.pair

    def top_interactions(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The k feature pairs with the largest |b|, as (feature, feature, b)."""
        order = np.argsort(-np.abs(self.pair), kind="stable")[: max(int(k), 0)]
        return [(int(self.pairs[i, 0]), int(self.pairs[i, 1]), float(self.pair[i])) for i in order]

    def unit_interactions(self) -> np.ndarray:
        """(n_units, n_units) symmetric sum of |b| between units' features: the heatmap."""
        n_units = int(self.units.max()) + 1
        out = np.zeros((n_units, n_units))
        ua, ub = self.units[self.pairs[:, 0]], self.units[self.pairs[:, 1]]
        np.add.at(out, (ua, ub), np.abs(self.pair))
        return out + out.T


def holdout_r2(surrogate: PairwiseSurrogate, x: np.ndarray, y: np.ndarray,
               rng: np.random.Generator, holdout: float = 0.25, **fit_kwargs) -> float:
    """Fit on all but a random ``holdout`` share of the points, R^2 on the held-out ones."""
    x, y = np.asarray(x), np.asarray(y, dtype=float)
    if not 0 < holdout < 1:
        raise SmpqError(f"holdout must be in (0, 1), got {holdout}")
    n_test = int(round(holdout * len(y)))
    if n_test < 2 or len(y) - n_test < 1:
        raise SmpqError(f"{len(y)} points are too few for a holdout of {holdout}")
    test = np.zeros(len(y), dtype=bool)
    test[rng.choice(len(y), n_test, replace=False)] = True
    surrogate.fit(x[~test], y[~test], **fit_kwargs)
    return surrogate.r2(x[test], y[test])
