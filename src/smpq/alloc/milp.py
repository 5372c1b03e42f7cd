"""Exact allocation: the best policy (or the K best) within every limit, and why it stops there.

The objective -- linear or quadratic, `smpq.alloc.objectives` -- is solved exactly by HiGHS
(`scipy.optimize.milp`), with brute-force enumeration as the oracle for tests; both share one
report (`Allocation`: totals, slack, binding and tight limits).

HiGHS accepts solutions that break a row by ~1e-7 of its scale, looser than `fits`
(`smpq.alloc.problem`); such a policy is cut off (a no-good cut on its binary variables) and
the MILP re-solved. The same cuts give the K best distinct feasible policies (`allocate_topk`).
The optimum is exact to ~1e-9 of the objective's scale; values closer than SCORE_REL_TOL of it
count as equal (the binding report).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, milp

from smpq.alloc.objectives import (
    Choice,
    LinearObjective,
    PairwiseObjective,
    QuadraticObjective,
    _enumerate,
    _Linear,
    _Pairwise,
    _Quadratic,
)
from smpq.alloc.problem import REL_TOL, Problem, total
from smpq.alloc.quiet import quiet_solver
from smpq.errors import SmpqError

__all__ = [
    "Allocation",
    "LinearObjective",
    "PairwiseObjective",
    "QuadraticObjective",
    "allocate_bruteforce",
    "allocate_milp",
    "allocate_quadratic",
    "allocate_quadratic_bruteforce",
    "allocate_topk",
]

Objective = LinearObjective | QuadraticObjective | PairwiseObjective
MAX_BRUTEFORCE = 2_000_000
MAX_CUTS = 100


@dataclass(frozen=True)
class Allocation:
    """An optimal policy and why it stops where it does.

    `costs` covers every metric given (limited or not); `limits`, `slack`, `binding` and `tight`
    only the limited ones. A limit is *binding* when dropping it (keeping the others) lets the
    optimum score rise by more than the score tolerance: it is what actually holds the policy
    back. (Two limits that each alone would hold the same policy back are both non-binding by
    this test; `tight` still shows them.) It is *tight* when its slack is smaller than every
    one-unit move from the chosen policy that would raise this metric: the budget is used up,
    whether or not that costs score.
    `status` is "optimal", or "time_limit" when the solver stopped early with a feasible policy.
    `seconds` is the time spent finding the policy (not the binding analysis).
    """

    choice: tuple[int, ...]
    score: float
    costs: dict[str, float]
    limits: dict[str, float]
    slack: dict[str, float]
    binding: tuple[str, ...]
    tight: tuple[str, ...]
    status: str
    seconds: float


# ---------------------------------------------------------------------------- solvers

_Solve = Callable[[Problem, "_Linear | _Quadratic | _Pairwise", tuple[str, ...], "float | None",
                   Sequence[Choice]], tuple["Choice | None", str]]


def _milp_solve(p: Problem, obj: _Linear | _Quadratic | _Pairwise, metrics: tuple[str, ...],
                time_limit: float | None, excluded: Sequence[Choice] = ()
                ) -> tuple[Choice | None, str]:
    """Optimal choice under `metrics`' limits other than `excluded`, or None when infeasible."""
    model = obj.model(p, metrics)
    if not model.c.size:  # one candidate per unit: nothing to choose
        choice = (0,) * len(p.sizes)
        ok = p.feasible(metrics, choice) and choice not in excluded
        return (choice, "optimal") if ok else (None, "infeasible")
    constraints = model.constraints + [model.cut(c) for c in excluded]
    options: dict[str, object] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    for _ in range(MAX_CUTS + 1):
        with quiet_solver():  # HiGHS prints below Python, into the progress bars
            res = milp(model.c, integrality=model.integrality,
                       bounds=Bounds(np.zeros(model.c.size), model.ub),
                       constraints=constraints, options=options)
        if res.x is None:
            if res.status == 2:
                return None, "infeasible"
            if res.status == 1:
                raise SmpqError(f"no policy found within the time limit of {time_limit:g} s")
            raise SmpqError(f"MILP solver failed: {res.message}")
        choice = model.decode(res.x)
        if p.feasible(metrics, choice):
            return choice, "optimal" if res.status == 0 else "time_limit"
        constraints.append(model.cut(choice))
    raise SmpqError(
        f"could not meet the limits to relative precision {REL_TOL:g} after {MAX_CUTS} "
        "attempts; loosen the budget slightly"
    )


def _brute_solve(p: Problem, obj: _Linear | _Quadratic | _Pairwise, metrics: tuple[str, ...],
                 time_limit: float | None, excluded: Sequence[Choice] = ()
                 ) -> tuple[Choice | None, str]:
    """Optimal choice by enumeration; among ties the first in product order."""
    del time_limit
    combos = math.prod(p.sizes)
    if combos > MAX_BRUTEFORCE:
        raise SmpqError(
            f"brute force would enumerate {combos:.3g} policies, more than {MAX_BRUTEFORCE:.3g}; "
            "use the MILP allocator"
        )
    mask = np.ones(combos, dtype=bool)
    for m in metrics:
        mask &= _enumerate(p.costs[m]) <= p.limits[m] + p.tols[m]
    for c in excluded:
        mask[np.ravel_multi_index(c, p.sizes)] = False
    values = obj.all_values()
    mask &= np.isfinite(values)  # -inf marks policies the objective rules out
    if not mask.any():
        return None, "infeasible"
    best = int(np.argmax(np.where(mask, values, -np.inf)))
    return tuple(int(i) for i in np.unravel_index(best, p.sizes)), "optimal"


# ---------------------------------------------------------------------------- the report


def _allocate(objective: Objective, costs: object, limits: object,
              time_limit: float | None, solve: _Solve, k: int = 1,
              scales: Mapping[str, float] | None = None, exclude: Sequence[Choice] = (),
              binding: bool = True) -> tuple[Allocation, ...]:
    """The k best distinct feasible policies, best first, each with the shared report.

    `exclude` removes policies up front (e.g. already evaluated); `binding=False` skips the
    binding analysis (one extra solve per limit) when only the policies are wanted."""
    if isinstance(objective, LinearObjective | PairwiseObjective):
        obj: _Linear | _Quadratic | _Pairwise = objective.bind(None)
        sizes = tuple(len(s) for s in (obj.scores if isinstance(obj, _Linear) else obj.linear))
        p = Problem.build(costs, limits, sizes, scales)
    else:
        p = Problem.build(costs, limits, None, scales)
        obj = objective.bind(p.sizes)
    if time_limit is not None and not time_limit > 0:
        raise SmpqError(f"time limit must be positive, got {time_limit}")
    if k < 1:
        raise SmpqError(f"k must be at least 1, got {k}")
    message = p.unreachable_message()
    if message:
        raise SmpqError(message)
    active = p.active()
    found: list[tuple[Choice, str, float]] = []
    skip = [tuple(int(x) for x in c) for c in exclude]
    while len(found) < k:
        start = time.perf_counter()
        choice, status = solve(p, obj, active, time_limit, skip + [c for c, _, _ in found])
        if choice is None:
            break
        found.append((choice, status, time.perf_counter() - start))
    if not found:
        raise SmpqError(p.joint_message(active))
    best = obj.value(found[0][0])

    def binds(metric: str) -> bool:
        relaxed, _ = solve(p, obj, tuple(m for m in active if m != metric), time_limit, ())
        return relaxed is not None and obj.value(relaxed) > best + obj.score_tol

    binding = tuple(m for m in active if binds(m)) if binding else ()
    out = []
    for choice, status, seconds in found:
        totals = {m: total(layers, choice) for m, layers in p.costs.items()}
        slack = {m: lim - totals[m] for m, lim in p.limits.items()}
        out.append(Allocation(
            choice=choice, score=obj.value(choice), costs=totals, limits=dict(p.limits),
            slack=slack, binding=binding,
            tight=tuple(m for m in p.limits if p.tight(m, choice, slack[m])),
            status=status, seconds=seconds))
    return tuple(out)


def allocate_milp(
    scores: list[np.ndarray],
    costs: dict[str, list[np.ndarray]],
    limits: dict[str, float],
    time_limit: float | None = 60,
    *,
    scales: Mapping[str, float] | None = None,
) -> Allocation:
    """Best-scoring policy within every limit, exactly, via a binary MILP (HiGHS).

    `costs` may hold metrics without a limit; they are only reported. `time_limit` (seconds)
    applies to each solve; the binding analysis re-solves once per limit that could bind.
    `scales` sets the tolerance scale per metric (`smpq.alloc.problem.fits`).
    """
    return _allocate(LinearObjective(scores), costs, limits, time_limit, _milp_solve,
                     scales=scales)[0]


def allocate_bruteforce(
    scores: list[np.ndarray],
    costs: dict[str, list[np.ndarray]],
    limits: dict[str, float],
    time_limit: float | None = 60,
    *,
    scales: Mapping[str, float] | None = None,
) -> Allocation:
    """Same answer as `allocate_milp` by enumerating every policy (at most 2e6): the oracle."""
    return _allocate(LinearObjective(scores), costs, limits, time_limit, _brute_solve,
                     scales=scales)[0]


def allocate_quadratic(
    gains: np.ndarray,
    interactions: np.ndarray,
    costs: Mapping[str, list[np.ndarray]],
    limits: Mapping[str, float],
    risk: float = 1.0,
    time_limit: float | None = 60,
    *,
    scales: Mapping[str, float] | None = None,
) -> Allocation:
    """Exact maximiser of gains'q - risk q'Kq (module docstring) under every limit."""
    return _allocate(QuadraticObjective(gains, interactions, risk), costs, limits, time_limit,
                     _milp_solve, scales=scales)[0]


def allocate_quadratic_bruteforce(
    gains: np.ndarray,
    interactions: np.ndarray,
    costs: Mapping[str, list[np.ndarray]],
    limits: Mapping[str, float],
    risk: float = 1.0,
    time_limit: float | None = 60,
    *,
    scales: Mapping[str, float] | None = None,
) -> Allocation:
    """`allocate_quadratic` by enumeration: the oracle for tests and tiny problems."""
    return _allocate(QuadraticObjective(gains, interactions, risk), costs, limits, time_limit,
                     _brute_solve, scales=scales)[0]


def allocate_topk(
    objective: Objective,
    costs: Mapping[str, list[np.ndarray]],
    limits: Mapping[str, float],
    k: int,
    time_limit: float | None = 60,
    *,
    scales: Mapping[str, float] | None = None,
    bruteforce: bool = False,
    exclude: Sequence[Sequence[int]] = (),
    binding: bool = True,
) -> tuple[Allocation, ...]:
    """The k best distinct feasible policies, best first (fewer when fewer are feasible).

    Each solve adds a no-good cut on the policies found so far (and on `exclude`), so scores
    never increase down the list; ties come in solver order. `binding` is the analysis of the
    best policy, shared by every entry (skipped with `binding=False`). `bruteforce=True`
    enumerates instead (at most 2e6 policies).
    """
    return _allocate(objective, costs, limits, time_limit,
                     _brute_solve if bruteforce else _milp_solve, k=k, scales=scales,
                     exclude=exclude, binding=binding)
