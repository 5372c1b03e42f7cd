"""The objectives the allocator maximises, and each one's MILP formulation.

Linear (`LinearObjective`, the multiple-choice knapsack): unit u's choice k scores s_uk and the
policy's score is the sum; the MILP has one binary per (unit, choice). Quadratic
(`QuadraticObjective`): unit u's candidates are a ladder c_0 < ... < c_{K-1}, the indicators
q_{u,k} = [level_u >= k] (k >= 1) gain `gains[u,k]` each and interact through a matrix:
score = gains'q - risk q'Kq. Same-unit products equal the higher step's indicator;
cross-unit products y = q_i q_j are linearised exactly (y >= q_i + q_j - 1 for penalised
pairs, y <= q_i, q_j for rewarded ones). Each formulation also says how to read a choice off a
solution and how to cut one choice off (a no-good cut on its binaries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import LinearConstraint

from smpq.alloc.problem import SCORE_REL_TOL, Layers, Problem, as_layers, low, total
from smpq.errors import SmpqError

__all__ = ["LinearObjective", "QuadraticObjective"]

Choice = tuple[int, ...]


@dataclass
class _Model:
    """A MILP over binaries (the choice) and, for the quadratic, continuous products."""

    c: np.ndarray
    integrality: np.ndarray
    ub: np.ndarray
    constraints: list[LinearConstraint]
    decode: Callable[[np.ndarray], Choice]
    cut: Callable[[Choice], LinearConstraint]


# ---------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class LinearObjective:
    """score(policy) = sum_u scores[u][k_u]."""

    scores: Sequence[np.ndarray]

    def bind(self, sizes: tuple[int, ...] | None) -> _Linear:
        return _Linear(as_layers("scores", self.scores, sizes))


@dataclass(frozen=True)
class QuadraticObjective:
    """score = gains'q - risk q'Kq over the ladder indicators q (unit-major, steps 1..K_u-1)."""

    gains: np.ndarray
    interactions: np.ndarray
    risk: float = 1.0

    def bind(self, sizes: tuple[int, ...]) -> _Quadratic:
        n_q = sum(k - 1 for k in sizes)
        gains = np.asarray(self.gains, dtype=float).ravel()
        k_mat = np.asarray(self.interactions, dtype=float)
        if gains.shape != (n_q,) or k_mat.shape != (n_q, n_q):
            raise SmpqError(f"a quadratic objective over these units needs {n_q} gains and an "
                            f"{n_q}x{n_q} matrix, got {gains.shape} and {k_mat.shape}")
        if not (np.all(np.isfinite(gains)) and np.all(np.isfinite(k_mat))
                and math.isfinite(self.risk)):
            raise SmpqError("a quadratic objective needs finite gains, matrix and risk")
        return _Quadratic(gains, k_mat, float(self.risk), sizes)


class _Linear:
    def __init__(self, scores: Layers) -> None:
        self.scores = scores
        self.score_tol = SCORE_REL_TOL * math.fsum(float(np.max(s) - np.min(s)) for s in scores)

    def value(self, choice: Sequence[int]) -> float:
        return total(self.scores, choice)

    def all_values(self) -> np.ndarray:
        return _enumerate(self.scores)

    def model(self, p: Problem, metrics: Sequence[str]) -> _Model:
        sizes = p.sizes
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        n = int(offsets[-1])
        layer_of = np.repeat(np.arange(len(sizes)), sizes)
        onehot = sparse.csr_matrix((np.ones(n), (layer_of, np.arange(n))), shape=(len(sizes), n))
        constraints = [LinearConstraint(onehot, 1, 1)]
        ub = np.ones(n)
        for m in metrics:
            row, allowed, rhs = _cost_row(p.costs[m], p.limits[m], p.tols[m])
            ub[~allowed] = 0.0
            constraints.append(LinearConstraint(sparse.csr_matrix(row), -np.inf, rhs))

        def decode(x: np.ndarray) -> Choice:
            return tuple(int(np.argmax(x[a:b])) for a, b in zip(offsets[:-1], offsets[1:],
                                                                 strict=True))

        def cut(choice: Choice) -> LinearConstraint:
            row = sparse.csr_matrix(
                (np.ones(len(sizes)), (np.zeros(len(sizes), int), offsets[:-1] + choice)),
                shape=(1, n))
            return LinearConstraint(row, -np.inf, len(sizes) - 1)

        return _Model(_normalised_objective(self.scores), np.ones(n), ub, constraints, decode,
                      cut)


def _normalised_objective(scores: Layers) -> np.ndarray:
    """Costs to minimise: per-unit regret from the best choice, the total spread scaled to 1e6.

    At that scale HiGHS's default absolute gap (1e-6) is 1e-12 of the spread, so the gap that
    stops it is the relative one (0)."""
    spread = math.fsum(float(np.max(s) - np.min(s)) for s in scores) or 1.0
    return np.concatenate([(np.max(s) - s) / spread * 1e6 for s in scores])


def _cost_row(layers: Layers, limit: float, tol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A well-scaled constraint row: costs above each unit's cheapest, over the headroom.

    Returns (row, allowed, rhs). Choices that alone exceed the headroom are not allowed (their
    variables are fixed to 0), so the kept coefficients lie in [0, 1] and rhs is 1.
    """
    shifted = np.concatenate([a - np.min(a) for a in layers])
    room = limit - low(layers) + tol
    allowed = shifted <= room
    scale = room if room > 0 else 1.0
    return np.where(allowed, shifted / scale, 0.0), allowed, room / scale


class _Quadratic:
    def __init__(self, gains: np.ndarray, k_mat: np.ndarray, risk: float,
                 sizes: tuple[int, ...]) -> None:
        self.gains, self.k_mat, self.risk, self.sizes = gains, k_mat, risk, sizes
        self.unit_of = np.repeat(np.arange(len(sizes)), [k - 1 for k in sizes])
        self.step_of = np.concatenate([np.arange(1, k) for k in sizes]).astype(int)
        lin = gains - risk * np.diag(k_mat)
        self.pairs: list[tuple[int, int]] = []
        self.coef: list[float] = []
        for i in range(len(gains)):
            for j in range(i + 1, len(gains)):
                c = -risk * (k_mat[i, j] + k_mat[j, i])
                if c == 0:
                    continue
                if self.unit_of[i] == self.unit_of[j]:
                    lin[j] += c  # q_i q_j = q_j for j above i in the same unit
                else:
                    self.pairs.append((i, j))
                    self.coef.append(c)
        self.lin = lin
        self.score_tol = SCORE_REL_TOL * (float(np.abs(lin).sum()) + float(np.abs(self.coef).sum()))

    def indicators(self, choice: np.ndarray) -> np.ndarray:
        """q for a batch of choices (n, U) -> (n, n_q)."""
        return (np.asarray(choice)[:, self.unit_of] >= self.step_of[None, :]).astype(float)

    def value(self, choice: Sequence[int]) -> float:
        q = self.indicators(np.asarray([choice]))[0]
        return float(self.gains @ q - self.risk * q @ self.k_mat @ q)

    def all_values(self) -> np.ndarray:
        out = []
        n = math.prod(self.sizes)
        for start in range(0, n, 1 << 16):
            idx = np.arange(start, min(start + (1 << 16), n))
            q = self.indicators(np.stack(np.unravel_index(idx, self.sizes), axis=1))
            out.append(q @ self.gains - self.risk * np.einsum("ni,ij,nj->n", q, self.k_mat, q))
        return np.concatenate(out)

    def model(self, p: Problem, metrics: Sequence[str]) -> _Model:
        n_q, n_y = len(self.gains), len(self.pairs)
        obj = -np.concatenate([self.lin, self.coef])
        obj = obj / ((np.max(np.abs(obj)) if obj.size else 0.0) or 1.0)
        r_idx: list[int] = []
        c_idx: list[int] = []
        vals: list[float] = []
        hi: list[float] = []

        def row(entries: Sequence[tuple[int, float]], upper: float) -> None:
            for col, v in entries:
                r_idx.append(len(hi))
                c_idx.append(col)
                vals.append(v)
            hi.append(upper)

        for i in range(n_q - 1):
            if self.unit_of[i] == self.unit_of[i + 1]:
                row([(i + 1, 1.0), (i, -1.0)], 0.0)  # the ladder: q_{u,k+1} <= q_{u,k}
        for t, ((i, j), c) in enumerate(zip(self.pairs, self.coef, strict=True)):
            if c < 0:  # penalised: y >= q_i + q_j - 1 (y >= 0 by its bound)
                row([(i, 1.0), (j, 1.0), (n_q + t, -1.0)], 1.0)
            else:  # rewarded: y <= q_i, y <= q_j
                row([(n_q + t, 1.0), (i, -1.0)], 0.0)
                row([(n_q + t, 1.0), (j, -1.0)], 0.0)
        for m in metrics:
            lim = p.limits[m]
            base = sum(float(c[0]) for c in p.costs[m])
            deltas = np.concatenate([np.diff(c) for c in p.costs[m]])
            scale = max(abs(lim - base), float(np.abs(deltas).sum()), 1e-30)
            row([(k, d / scale) for k, d in enumerate(deltas) if d != 0], (lim - base) / scale)
        cons = []
        if hi:
            a = sparse.csr_matrix((vals, (r_idx, c_idx)), shape=(len(hi), n_q + n_y))
            cons = [LinearConstraint(a, -np.inf, np.array(hi))]
        units = len(self.sizes)

        def decode(x: np.ndarray) -> Choice:
            q = np.round(x[:n_q])
            return tuple(int(x) for x in np.bincount(self.unit_of, weights=q, minlength=units))

        def cut(choice: Choice) -> LinearConstraint:
            q = self.indicators(np.asarray([choice]))[0]
            coeffs = np.concatenate([np.where(q > 0, 1.0, -1.0), np.zeros(n_y)])
            return LinearConstraint(coeffs[None, :], -np.inf, float(q.sum()) - 1)

        integrality = np.concatenate([np.ones(n_q), np.zeros(n_y)])
        return _Model(obj, integrality, np.ones(n_q + n_y), cons, decode, cut)


def _enumerate(layers: Layers) -> np.ndarray:
    """Totals of every policy, in itertools.product order (last unit varies fastest)."""
    out = np.zeros(1)
    for a in layers:
        out = (out[:, None] + a[None, :]).ravel()
    return out
