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
from collections.abc import Callable, Mapping, Sequence
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


@dataclass(frozen=True)
class PairwiseObjective:
    """score = sum_u linear[u][k_u] + sum_{(u, v)} pairs[(u, v)][k_u, k_v] over choices (u < v).

    The general pairwise form (any candidate grid per unit, e.g. (weight, activation) pairs);
    the engine's surrogate compiles to it. `near = (centre, r)` restricts the policies to
    those that differ from `centre` in at most r units (a trust region).
    """

    linear: Sequence[np.ndarray]
    pairs: Mapping[tuple[int, int], np.ndarray]
    near: tuple[Sequence[int], int] | None = None

    def bind(self, sizes: tuple[int, ...] | None) -> _Pairwise:
        linear = as_layers("linear scores", self.linear, sizes)
        n_units = len(linear)
        pairs = {}
        for (u, v), q in self.pairs.items():
            q = np.asarray(q, dtype=float)
            if not (0 <= u < v < n_units) or q.shape != (len(linear[u]), len(linear[v])):
                raise SmpqError(f"pair ({u}, {v}) needs u < v < {n_units} and a "
                                f"{len(linear[u])}x{len(linear[v])} matrix, got {q.shape}")
            if not np.all(np.isfinite(q)):
                raise SmpqError("a pairwise objective needs finite entries")
            pairs[(int(u), int(v))] = q
        near = None
        if self.near is not None:
            centre, r = self.near
            centre = tuple(int(c) for c in centre)
            if len(centre) != n_units or not all(0 <= c < len(s) for c, s in zip(
                    centre, linear, strict=True)) or int(r) < 0:
                raise SmpqError("a trust region needs one valid choice per unit and r >= 0")
            near = (centre, int(r))
        return _Pairwise(linear, pairs, near)


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


class _Pairwise:
    """One-hot x per unit; per interacting pair of units continuous y_uv[c, d] >= 0 with
    sum_d y[c, d] = x_uc and sum_c y[c, d] = x_vd. For binary x this forces y = x_uc x_vd
    exactly, and the LP relaxation (the local marginal polytope) is far tighter than McCormick
    bounds on single products, so HiGHS closes the gap in few nodes."""

    def __init__(self, linear: Layers, pairs: dict[tuple[int, int], np.ndarray],
                 near: tuple[tuple[int, ...], int] | None = None) -> None:
        self.linear, self.pairs, self.near = linear, pairs, near
        spread = math.fsum(float(np.ptp(s)) for s in linear)
        spread += math.fsum(float(np.ptp(q)) for q in pairs.values())
        self.score_tol = SCORE_REL_TOL * spread

    def value(self, choice: Sequence[int]) -> float:
        out = total(self.linear, choice)
        return out + math.fsum(float(q[choice[u], choice[v]]) for (u, v), q in self.pairs.items())

    def all_values(self) -> np.ndarray:
        sizes = tuple(len(s) for s in self.linear)
        out = _enumerate(self.linear)
        idx = np.unravel_index(np.arange(out.size), sizes)
        for (u, v), q in self.pairs.items():
            out = out + q[idx[u], idx[v]]
        if self.near is not None:  # outside the trust region: never chosen
            centre, r = self.near
            moved = sum((np.asarray(i) != c).astype(int) for i, c in zip(idx, centre,
                                                                          strict=True))
            out = np.where(moved <= r, out, -np.inf)
        return out

    def model(self, p: Problem, metrics: Sequence[str]) -> _Model:
        base = _Linear(self.linear).model(p, metrics)
        sizes = p.sizes
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        n_x = int(offsets[-1])
        c_x = -np.concatenate([np.asarray(s, float) for s in self.linear])
        c_y: list[float] = []
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        n_rows = 0

        def marginal(ys: Sequence[int], x: int) -> None:  # sum(y) - x = 0
            nonlocal n_rows
            rows.extend([n_rows] * (len(ys) + 1))
            cols.extend([*(int(y) for y in ys), int(x)])
            vals.extend([1.0] * len(ys) + [-1.0])
            n_rows += 1

        for (u, v), q in self.pairs.items():
            nu, nv = q.shape
            grid = n_x + len(c_y) + np.arange(nu * nv).reshape(nu, nv)
            c_y.extend((-q).ravel().tolist())
            for c in range(nu):
                marginal(grid[c], offsets[u] + c)
            for d in range(nv):
                marginal(grid[:, d], offsets[v] + d)
        n = n_x + len(c_y)
        pad = n - n_x
        widen = [LinearConstraint(sparse.hstack([sparse.csr_matrix(c.A),
                                                 sparse.csr_matrix((c.A.shape[0], pad))]).tocsr(),
                                  c.lb, c.ub) for c in base.constraints]
        if n_rows:
            a = sparse.csr_matrix((vals, (rows, cols)), shape=(n_rows, n))
            widen.append(LinearConstraint(a, 0.0, 0.0))
        if self.near is not None:  # sum_u x_{u, centre_u} >= U - r
            centre, r = self.near
            row = sparse.csr_matrix((np.ones(len(sizes)), (np.zeros(len(sizes), int),
                                                           offsets[:-1] + np.array(centre))),
                                    shape=(1, n))
            widen.append(LinearConstraint(row, len(sizes) - r, np.inf))
        obj = np.concatenate([c_x, np.array(c_y)])
        obj = obj / ((np.max(np.abs(obj)) if obj.size else 0.0) or 1.0)
        ub = np.concatenate([base.ub, np.ones(n - n_x)])

        def cut(choice: Choice) -> LinearConstraint:
            row = sparse.csr_matrix(
                (np.ones(len(sizes)), (np.zeros(len(sizes), int), offsets[:-1] + choice)),
                shape=(1, n))
            return LinearConstraint(row, -np.inf, len(sizes) - 1)

        integrality = np.concatenate([np.ones(n_x), np.zeros(n - n_x)])
        return _Model(obj, integrality, ub, widen, base.decode, cut)


def _enumerate(layers: Layers) -> np.ndarray:
    """Totals of every policy, in itertools.product order (last unit varies fastest)."""
    out = np.zeros(1)
    for a in layers:
        out = (out[:, None] + a[None, :]).ravel()
    return out
