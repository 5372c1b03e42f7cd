"""The uniform baseline's allocation: one candidate level for every unit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from smpq.alloc.problem import Problem, total
from smpq.errors import SmpqError

__all__ = ["uniform_choice"]


def uniform_choice(costs: Mapping[str, Sequence[np.ndarray]], limits: Mapping[str, float],
                   *, scales: Mapping[str, float] | None = None) -> tuple[int, ...]:
    """The highest candidate level whose uniform policy fits every limit (`Problem.fits`).

    Every unit must offer the same number of levels, ordered from cheapest to best."""
    p = Problem.build(costs, limits, None, scales)
    sizes = p.sizes
    if len(set(sizes)) != 1:
        raise SmpqError(f"a uniform choice needs the same candidates for every unit, got {sizes}")
    for level in reversed(range(sizes[0])):
        choice = (level,) * len(sizes)
        if all(p.fits(m, total(p.costs[m], choice)) for m in p.limits):
            return choice
    raise SmpqError("budget infeasible for a uniform policy: even every group at the lowest "
                    "candidate exceeds a limit")
