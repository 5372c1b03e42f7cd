"""Exact top-K of a quadratic objective over one choice per unit, under every limit.

    max  sum_u s_u[c_u] + sum_{u<v} Q_uv[c_u, c_v]   s.t.  sum_u cost_m[u][c_u] <= limit_m

as a MILP over one-hot x_uc. Each interacting pair of units gets continuous y_uv[c, d] >= 0
with the marginal constraints sum_d y[c, d] = x_uc and sum_c y[c, d] = x_vd: for binary x
this forces y[c, d] = x_uc x_vd exactly, and its LP relaxation (the local marginal polytope)
is far tighter than McCormick bounds on single products, so HiGHS closes the gap quickly. Distinct solutions come from no-good cuts: sum_u x_{u, c*_u} <= U - 1
removes exactly the policy c*, so the k-th solve returns the k-th best (ties in any order).
Policies in `exclude` (e.g. already evaluated) are cut from the start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError

__all__ = ["quadratic_topk", "quadratic_value"]


def quadratic_value(linear: Sequence[np.ndarray], quad: Mapping[tuple[int, int], np.ndarray],
                    choices: np.ndarray) -> np.ndarray:
    """The objective of a batch of choices (n, units)."""
    choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
    out = np.zeros(len(choices))
    for u, s in enumerate(linear):
        out += np.asarray(s, float)[choices[:, u]]
    for (u, v), q in quad.items():
        out += q[choices[:, u], choices[:, v]]
    return out


class _Rows:
    def __init__(self) -> None:
        self.r: list[int] = []
        self.c: list[int] = []
        self.v: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, cols: Sequence[int], vals: Sequence[float], lo: float, hi: float) -> None:
        k = len(self.lo)
        self.r.extend([k] * len(cols))
        self.c.extend(int(c) for c in cols)
        self.v.extend(float(v) for v in vals)
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self, n_cols: int) -> LinearConstraint:
        a = sparse.csr_matrix((self.v, (self.r, self.c)), shape=(len(self.lo), n_cols))
        return LinearConstraint(a, np.array(self.lo), np.array(self.hi))


def quadratic_topk(space: PolicySpace, linear: Sequence[np.ndarray],
                   quad: Mapping[tuple[int, int], np.ndarray], k: int = 1, *,
                   exclude: Sequence[Sequence[int]] = (), time_limit: float = 30.0,
                   ) -> list[tuple[int, ...]]:
    """The k best distinct feasible policies (fewer when fewer exist), best first."""
    if k < 1:
        raise SmpqError("k must be at least 1")
    n_units = space.n_units
    offs = np.concatenate([[0], np.cumsum([space.n_choices(u) for u in range(n_units)])])
    n_x = int(offs[-1])
    obj = np.zeros(n_x)
    for u, s in enumerate(linear):
        obj[offs[u]:offs[u + 1]] = np.asarray(s, float)
    rows = _Rows()
    for u in range(n_units):
        cols = range(offs[u], offs[u + 1])
        rows.add(cols, [1.0] * len(cols), 1.0, 1.0)
    zobj: list[float] = []
    for (u, v), q in quad.items():
        q = np.asarray(q, float)
        nu, nv = q.shape
        base = n_x + len(zobj)
        zobj.extend(q.ravel().tolist())
        for c in range(nu):  # sum_d y[c, d] = x_uc
            rows.add([base + c * nv + d for d in range(nv)] + [offs[u] + c],
                     [1.0] * nv + [-1.0], 0.0, 0.0)
        for d in range(nv):  # sum_c y[c, d] = x_vd
            rows.add([base + c * nv + d for c in range(nu)] + [offs[v] + d],
                     [1.0] * nu + [-1.0], 0.0, 0.0)
    n_z = len(zobj)
    for m, lim in space.limits.items():
        coef = np.concatenate([np.asarray(r, float) for r in space.costs[m]])
        room = float(lim) - float(space.offsets.get(m, 0.0)) + space.tolerance(m)
        scale = max(float(np.abs(coef).max()), 1e-300)
        nz = np.nonzero(coef)[0]
        rows.add(nz, coef[nz] / scale, -np.inf, room / scale)
    c_full = -np.concatenate([obj, np.array(zobj)])
    norm = float(np.max(np.abs(c_full))) or 1.0
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_z)])
    bounds = Bounds(0.0, 1.0)

    def cut(choice: Sequence[int]) -> None:
        rows.add([offs[u] + int(c) for u, c in enumerate(choice)], [1.0] * n_units,
                 -np.inf, n_units - 1)

    for choice in exclude:
        cut(choice)
    found: list[tuple[int, ...]] = []
    for _ in range(k):
        res = milp(c_full / norm, integrality=integrality, bounds=bounds,
                   constraints=[rows.constraint(n_x + n_z)],
                   options={"mip_rel_gap": 1e-9, "time_limit": time_limit, "disp": False})
        if res.x is None:
            break
        x = np.round(res.x[:n_x])
        choice = tuple(int(np.argmax(x[offs[u]:offs[u + 1]])) for u in range(n_units))
        if not space.fits(np.array(choice))[0]:
            break  # the tolerance let through an infeasible policy: stop rather than return it
        found.append(choice)
        cut(choice)
    return found
