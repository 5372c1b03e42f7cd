"""The surrogate's allocation: the k best distinct feasible policies of a pairwise objective.

A thin bridge from a `PolicySpace` (units, full-total limits) to the one allocator
(`smpq.alloc`, `PairwiseObjective`): limits become unit limits (offsets removed) with the
full limits as tolerance scales, so "fits" means exactly what `Budget.check` means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from smpq.alloc.milp import allocate_topk
from smpq.alloc.objectives import PairwiseObjective
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
        out += np.asarray(q, float)[choices[:, u], choices[:, v]]
    return out


def quadratic_topk(space: PolicySpace, linear: Sequence[np.ndarray],
                   quad: Mapping[tuple[int, int], np.ndarray], k: int = 1, *,
                   exclude: Sequence[Sequence[int]] = (), time_limit: float = 30.0,
                   near: tuple[Sequence[int], int] | None = None) -> list[tuple[int, ...]]:
    """The k best distinct feasible policies not in `exclude` (fewer when fewer exist);
    `near = (centre, r)`: only policies that change at most r units of `centre`."""
    if k < 1:
        raise SmpqError("k must be at least 1")
    costs = {m: [np.asarray(r, float) for r in rows] for m, rows in space.costs.items()}
    limits = {m: float(lim) - float(space.offsets.get(m, 0.0)) for m, lim in space.limits.items()}
    scales = {m: float(lim) for m, lim in space.limits.items()}
    if not limits:  # nothing limits the policy: a dummy limit keeps the problem well-formed
        m = next(iter(costs))
        limits = {m: sum(float(np.max(r)) for r in costs[m])}
    try:
        found = allocate_topk(PairwiseObjective(list(linear), dict(quad), near), costs, limits, k,
                              time_limit, scales=scales, exclude=exclude, binding=False)
    except SmpqError as e:
        if "infeasible" in str(e):  # every feasible policy is excluded
            return []
        raise
    return [a.choice for a in found]
