"""Exact bit-width allocation: the multiple-choice knapsack over per-layer choices.

Layer `l` has `K_l` candidate choices, each with a score (higher is better) and a cost under
every metric. A policy picks exactly one choice per layer; it is feasible when, for every
limited metric, the summed cost is at most the limit. We want the feasible policy with the
highest total score, solved exactly (HiGHS through `scipy.optimize.milp`), with brute force as
the oracle for tests and tiny networks.

Tolerances, stated once so every function agrees:

* A limit is met when `cost <= limit + tol`, `tol = 1e-9 * max(|limit|, sum_l max_k |c_lk|)`.
* The MILP optimum is exact to ~1e-9 of the total score spread
  `sum_l (max_k s_lk - min_k s_lk)`; scores differing by less than 1e-8 of it count as equal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from smpq.errors import SmpqError

__all__ = [
    "Allocation",
    "FeasibleCount",
    "allocate_bruteforce",
    "allocate_milp",
    "cheapest",
    "count_feasible",
    "most_expensive",
    "pareto_front",
]

REL_TOL = 1e-9
SCORE_REL_TOL = 1e-8
OBJECTIVE_SPREAD = 1e3
MAX_BRUTEFORCE = 2_000_000
MAX_CUTS = 100
MAX_BUCKETS = 100_000
SAMPLE_BUCKETS = 10_000

Layers = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Allocation:
    """An optimal policy and why it stops where it does.

    `costs` covers every metric given (limited or not); `limits`, `slack`, `binding` and `tight`
    only the limited ones. A limit is *binding* when dropping it (keeping the others) lets the
    optimum score rise by more than the score tolerance: it is what actually holds the policy
    back. (Two limits that each alone would hold the same policy back are both non-binding by
    this test; `tight` still shows them.) It is *tight* when its slack is smaller than every
    one-layer move from the chosen policy that would raise this metric: the budget is used up,
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


@dataclass(frozen=True)
class FeasibleCount:
    """log10 of the number of feasible policies (-inf when none), and how far to trust it.

    `exact` counts are combinatorially exact (held as floats, so ~12 significant digits).
    Estimates carry `rel_stderr`, the relative standard error of the count (inf when the
    sampler saw no feasible policy, in which case `log10` is -inf but the count may be > 0).
    """

    log10: float
    exact: bool
    rel_stderr: float = 0.0


@dataclass(frozen=True)
class _Problem:
    scores: Layers
    costs: dict[str, Layers]
    limits: dict[str, float]
    tols: dict[str, float]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.scores)


_Solved = tuple["tuple[int, ...] | None", str]
_Solve = Callable[[_Problem, tuple[str, ...], "float | None"], _Solved]


# ---------------------------------------------------------------------------- validation


def _as_layers(name: str, layers: object, sizes: tuple[int, ...] | None) -> Layers:
    """One finite, non-empty 1-D float array per layer, matching `sizes` when given."""
    if isinstance(layers, (str, bytes, Mapping)):
        raise SmpqError(f"{name} must be a list with one array per layer")
    try:
        items = list(layers)  # type: ignore[call-overload]
    except TypeError:
        raise SmpqError(f"{name} must be a list with one array per layer") from None
    if not items:
        raise SmpqError(f"{name} has no layers")
    if sizes is not None and len(items) != len(sizes):
        raise SmpqError(f"{name} has {len(items)} layers, expected {len(sizes)}")
    out = []
    for layer, item in enumerate(items):
        try:
            arr = np.array(item, dtype=float)
        except (TypeError, ValueError):
            raise SmpqError(f"{name} layer {layer} is not numeric") from None
        if arr.ndim != 1 or arr.size == 0:
            raise SmpqError(
                f"{name} layer {layer} must be a non-empty 1-D array, got shape {arr.shape}"
            )
        if sizes is not None and arr.size != sizes[layer]:
            raise SmpqError(f"{name} layer {layer} has {arr.size} choices, expected {sizes[layer]}")
        if not np.all(np.isfinite(arr)):
            raise SmpqError(f"{name} layer {layer} has a non-finite value")
        arr.setflags(write=False)
        out.append(arr)
    return tuple(out)


def _as_costs(costs: object, sizes: tuple[int, ...] | None) -> dict[str, Layers]:
    """Validated cost layers per metric; all metrics share the layer shapes."""
    if not isinstance(costs, Mapping):
        raise SmpqError("costs must map metric name -> one array per layer")
    out: dict[str, Layers] = {}
    for metric, layers in costs.items():
        out[str(metric)] = _as_layers(f"costs[{metric!r}]", layers, sizes)
        if sizes is None:
            sizes = tuple(len(a) for a in out[str(metric)])
    return out


def _as_limits(limits: object, costs: Mapping[str, Layers]) -> dict[str, float]:
    """Finite limits, each for a metric that has costs."""
    if not isinstance(limits, Mapping):
        raise SmpqError("limits must map metric name -> upper limit")
    out: dict[str, float] = {}
    for metric, value in limits.items():
        if metric not in costs:
            known = ", ".join(sorted(costs)) or "none"
            raise SmpqError(f"limit for {metric!r} has no costs (metrics with costs: {known})")
        try:
            limit = float(value)
        except (TypeError, ValueError):
            raise SmpqError(f"limit for {metric!r} must be a number, got {value!r}") from None
        if not math.isfinite(limit):
            raise SmpqError(f"limit for {metric!r} must be a finite number, got {limit}")
        out[metric] = limit
    return out


def _tolerance(limit: float, layers: Layers) -> float:
    """Absolute slack allowed on a limit: relative to the larger of the limit and the costs."""
    return REL_TOL * max(abs(limit), sum(float(np.max(np.abs(a))) for a in layers))


def _problem(scores: object, costs: object, limits: object) -> _Problem:
    score_layers = _as_layers("scores", scores, None)
    cost_layers = _as_costs(costs, tuple(len(a) for a in score_layers))
    lims = _as_limits(limits, cost_layers)
    tols = {m: _tolerance(lim, cost_layers[m]) for m, lim in lims.items()}
    return _Problem(score_layers, cost_layers, lims, tols)


# ---------------------------------------------------------------------------- small helpers


def _low(layers: Layers) -> float:
    return math.fsum(float(np.min(a)) for a in layers)


def _high(layers: Layers) -> float:
    return math.fsum(float(np.max(a)) for a in layers)


def _total(layers: Layers, choice: Sequence[int]) -> float:
    return math.fsum(float(a[k]) for a, k in zip(layers, choice, strict=True))


def _spread(scores: Layers) -> float:
    return math.fsum(float(np.max(s) - np.min(s)) for s in scores)


def _feasible(p: _Problem, metrics: Sequence[str], choice: Sequence[int]) -> bool:
    return all(_total(p.costs[m], choice) <= p.limits[m] + p.tols[m] for m in metrics)


def _active(p: _Problem) -> tuple[str, ...]:
    """Limits that some policy could break; the rest can never bind and are left out."""
    return tuple(m for m, lim in p.limits.items() if _high(p.costs[m]) > lim + p.tols[m])


def cheapest(costs: Mapping[str, Sequence[np.ndarray]]) -> dict[str, float]:
    """Lowest reachable total per metric (each metric minimised on its own)."""
    return {m: _low(layers) for m, layers in _as_costs(costs, None).items()}


def most_expensive(costs: Mapping[str, Sequence[np.ndarray]]) -> dict[str, float]:
    """Highest reachable total per metric: a limit at or above it never constrains."""
    return {m: _high(layers) for m, layers in _as_costs(costs, None).items()}


def _unreachable_message(p: _Problem) -> str | None:
    """Say which limits are below what even the cheapest choices cost, if any."""
    parts = [
        f"{m} limit {lim:.6g} is below the cheapest reachable {_low(p.costs[m]):.6g}"
        for m, lim in p.limits.items()
        if _low(p.costs[m]) > lim + p.tols[m]
    ]
    return "budget infeasible: " + "; ".join(parts) if parts else None


def _joint_message(p: _Problem, metrics: Sequence[str]) -> str:
    alone = ", ".join(
        f"{m} cheapest {_low(p.costs[m]):.6g} <= limit {p.limits[m]:.6g}" for m in metrics
    )
    return (
        f"budget infeasible: each limit is reachable on its own ({alone}) "
        "but no policy meets all of them at once"
    )


def _tight(p: _Problem, metric: str, choice: Sequence[int], slack: float) -> bool:
    """True when no single-layer move that raises `metric` fits in the slack."""
    steps = [
        float(np.min(up))
        for a, k in zip(p.costs[metric], choice, strict=True)
        if (up := a[a > a[k] + p.tols[metric]] - a[k]).size
    ]
    return bool(steps) and slack < min(steps)


# ---------------------------------------------------------------------------- solvers


def _normalised_objective(scores: Layers) -> np.ndarray:
    """Costs to minimise: per-layer regret from the best choice, total spread scaled to 1."""
    spread = _spread(scores) or 1.0
    return np.concatenate([(np.max(s) - s) / spread * 1e6 for s in scores])


def _cost_row(layers: Layers, limit: float, tol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A well-scaled constraint row: costs above each layer's cheapest, over the headroom.

    Returns (row, allowed, rhs). Choices that alone exceed the headroom are not allowed (their
    variables are fixed to 0), so the kept coefficients lie in [0, 1] and rhs is 1.
    """
    shifted = np.concatenate([a - np.min(a) for a in layers])
    room = limit - _low(layers) + tol
    allowed = shifted <= room
    scale = room if room > 0 else 1.0
    return np.where(allowed, shifted / scale, 0.0), allowed, room / scale


def _milp_solve(
    p: _Problem, metrics: tuple[str, ...], time_limit: float | None
) -> tuple[tuple[int, ...] | None, str]:
    """Optimal choice under `metrics`' limits, or None when infeasible.

    HiGHS accepts solutions that break a row by ~1e-7 of its scale, looser than our 1e-9; such a
    solution is cut off exactly (a no-good cut on that one policy) and the MILP re-solved.
    """
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
    options: dict[str, object] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    objective = _normalised_objective(p.scores)
    for _ in range(MAX_CUTS + 1):
        res = milp(
            objective,
            integrality=np.ones(n),
            bounds=Bounds(np.zeros(n), ub),
            constraints=constraints,
            options=options,
        )
        if res.x is None:
            if res.status == 2:
                return None, "infeasible"
            if res.status == 1:
                raise SmpqError(f"no policy found within the time limit of {time_limit:g} s")
            raise SmpqError(f"MILP solver failed: {res.message}")
        choice = tuple(
            int(np.argmax(res.x[a:b])) for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        )
        if _feasible(p, metrics, choice):
            return choice, "optimal" if res.status == 0 else "time_limit"
        cut = sparse.csr_matrix(
            (np.ones(len(sizes)), (np.zeros(len(sizes), int), offsets[:-1] + choice)),
            shape=(1, n),
        )
        constraints.append(LinearConstraint(cut, -np.inf, len(sizes) - 1))
    raise SmpqError(
        f"could not meet the limits to relative precision {REL_TOL:g} after {MAX_CUTS} "
        "attempts; loosen the budget slightly"
    )


def _check_enumerable(sizes: Sequence[int], limit: int) -> None:
    combos = math.prod(sizes)
    if combos > limit:
        raise SmpqError(
            f"brute force would enumerate {combos:.3g} policies, more than {limit:.3g}; "
            "use the MILP allocator"
        )


def _enumerate(layers: Layers) -> np.ndarray:
    """Totals of every policy, in itertools.product order (last layer varies fastest)."""
    total = np.zeros(1)
    for a in layers:
        total = (total[:, None] + a[None, :]).ravel()
    return total


def _brute_solve(
    p: _Problem, metrics: tuple[str, ...], time_limit: float | None
) -> tuple[tuple[int, ...] | None, str]:
    """Optimal choice by enumeration; among ties the first in product order."""
    del time_limit
    _check_enumerable(p.sizes, MAX_BRUTEFORCE)
    mask = np.ones(math.prod(p.sizes), dtype=bool)
    for m in metrics:
        mask &= _enumerate(p.costs[m]) <= p.limits[m] + p.tols[m]
    if not mask.any():
        return None, "infeasible"
    best = int(np.argmax(np.where(mask, _enumerate(p.scores), -np.inf)))
    return tuple(int(i) for i in np.unravel_index(best, p.sizes)), "optimal"


def _allocate(
    scores: object, costs: object, limits: object, time_limit: float | None, solve: _Solve
) -> Allocation:
    p = _problem(scores, costs, limits)
    if time_limit is not None and not time_limit > 0:
        raise SmpqError(f"time limit must be positive, got {time_limit}")
    message = _unreachable_message(p)
    if message:
        raise SmpqError(message)
    active = _active(p)
    start = time.perf_counter()
    choice, status = solve(p, active, time_limit)
    seconds = time.perf_counter() - start
    if choice is None:
        raise SmpqError(_joint_message(p, active))
    score = _total(p.scores, choice)
    score_tol = SCORE_REL_TOL * _spread(p.scores)

    def binds(metric: str) -> bool:
        relaxed, _ = solve(p, tuple(m for m in active if m != metric), time_limit)
        return relaxed is not None and _total(p.scores, relaxed) > score + score_tol

    totals = {m: _total(layers, choice) for m, layers in p.costs.items()}
    slack = {m: lim - totals[m] for m, lim in p.limits.items()}
    return Allocation(
        choice=choice,
        score=score,
        costs=totals,
        limits=dict(p.limits),
        slack=slack,
        binding=tuple(m for m in active if binds(m)),
        tight=tuple(m for m in p.limits if _tight(p, m, choice, slack[m])),
        status=status,
        seconds=seconds,
    )


def allocate_milp(
    scores: list[np.ndarray],
    costs: dict[str, list[np.ndarray]],
    limits: dict[str, float],
    time_limit: float | None = 60,
) -> Allocation:
    """Best-scoring policy within every limit, exactly, via a binary MILP (HiGHS).

    `costs` may hold metrics without a limit; they are only reported. `time_limit` (seconds)
    applies to each solve; the binding analysis re-solves once per limit that could bind.
    """
    return _allocate(scores, costs, limits, time_limit, _milp_solve)


def allocate_bruteforce(
    scores: list[np.ndarray],
    costs: dict[str, list[np.ndarray]],
    limits: dict[str, float],
    time_limit: float | None = 60,
) -> Allocation:
    """Same answer as `allocate_milp` by enumerating every policy (at most 2e6): the oracle."""
    return _allocate(scores, costs, limits, time_limit, _brute_solve)


# ---------------------------------------------------------------------------- counting


def _integer_units(
    layers: Layers, room: float, max_buckets: int
) -> tuple[list[np.ndarray], int] | None:
    """Exact integer units when costs above each layer's cheapest are integers on a grid.

    The grid is the gcd of those integer costs; None when they are not integers or the
    headroom spans more than `max_buckets` grid steps.
    """
    shifted = [a - np.min(a) for a in layers]
    flat = np.concatenate(shifted)
    ints = np.round(flat)
    if np.any(np.abs(flat - ints) > REL_TOL * np.maximum(1.0, np.abs(flat))) or ints.max() > 2**53:
        return None
    nonzero = ints[ints > 0].astype(np.int64)
    step = int(np.gcd.reduce(nonzero)) if nonzero.size else 1
    cap = math.floor(room / step)
    if cap > max_buckets:
        return None
    return [np.round(a).astype(np.int64) // step for a in shifted], cap


def _floor_units(layers: Layers, room: float, buckets: int) -> tuple[list[np.ndarray], int]:
    """Costs above each layer's cheapest, rounded *down* onto `buckets` steps of the headroom.

    Rounding down keeps every truly feasible policy feasible on the grid (a superset).
    """
    step = room / buckets
    units = [
        np.maximum(np.floor((a - np.min(a)) / step - 1e-9), 0).astype(np.int64) for a in layers
    ]
    return units, buckets


def _count_table(units: list[np.ndarray], cap: int, keep: bool) -> tuple[float, list[np.ndarray]]:
    """log10 #policies with total units <= cap, by DP over cumulative counts.

    tables[l][t] is proportional to the number of ways layers < l total at most t units; each
    table is normalised by its last entry (its maximum) to stay in float range.
    """
    table = np.ones(cap + 1)
    tables = [table] if keep else []
    log_scale = 0.0
    for u in units:
        new = np.zeros(cap + 1)
        values, counts = np.unique(u, return_counts=True)
        for value, count in zip(values, counts, strict=True):
            if value <= cap:
                new[value:] += count * table[: cap + 1 - value]
        top = new[-1]
        log_scale += math.log10(top)
        table = new / top
        if keep:
            tables.append(table)
    return log_scale, tables


def _sample(
    units: list[np.ndarray], cap: int, tables: list[np.ndarray], n: int, rng: np.random.Generator
) -> np.ndarray:
    """n policies drawn uniformly from those with total units <= cap, shape (n, L)."""
    remaining = np.full(n, cap, dtype=np.int64)
    choice = np.empty((n, len(units)), dtype=np.int64)
    for layer in reversed(range(len(units))):
        u = units[layer]
        idx = remaining[:, None] - u[None, :]
        weights = np.where(idx >= 0, tables[layer][np.clip(idx, 0, cap)], 0.0)
        cum = np.cumsum(weights, axis=1)
        pick = np.sum(cum < rng.random(n)[:, None] * cum[:, -1:], axis=1)
        pick = np.minimum(pick, u.size - 1)
        choice[:, layer] = pick
        remaining -= u[pick]
    return choice


def _policy_totals(layers: Layers, choice: np.ndarray) -> np.ndarray:
    """Totals for a batch of policies (n, L)."""
    width = max(a.size for a in layers)
    padded = np.zeros((len(layers), width))
    for layer, a in enumerate(layers):
        padded[layer, : a.size] = a
    return padded[np.arange(len(layers)), choice].sum(axis=1)


def _grid(layers: Layers, room: float, buckets: int) -> tuple[list[np.ndarray], int, bool]:
    exact = _integer_units(layers, room, buckets)
    return (*exact, True) if exact else (*_floor_units(layers, room, buckets), False)


def count_feasible(
    costs: Mapping[str, Sequence[np.ndarray]],
    limits: Mapping[str, float],
    *,
    samples: int = 20_000,
    seed: int = 0,
    max_buckets: int = MAX_BUCKETS,
    max_enumerate: int = MAX_BRUTEFORCE,
) -> FeasibleCount:
    """How many policies fit the budget, as log10: the size of the search space SMPQ faces.

    Exact when only one limit can bind and its costs above each layer's cheapest are integers
    whose gcd grid spans at most `max_buckets` steps of the headroom (DP over cost), or when
    there are at most `max_enumerate` policies (enumeration). Otherwise an unbiased estimate:
    DP on the most selective limit, with costs rounded down onto a grid, counts a superset of
    the feasible policies; uniform samples from that superset are checked exactly against
    every limit, and the count is the superset size times the fraction that pass.
    """
    layers = _as_costs(costs, None)
    if not layers:
        raise SmpqError("count_feasible needs at least one cost metric to know the layers")
    sizes = tuple(len(a) for a in next(iter(layers.values())))
    lims = _as_limits(limits, layers)
    tols = {m: _tolerance(lim, layers[m]) for m, lim in lims.items()}
    if any(_low(layers[m]) > lim + tols[m] for m, lim in lims.items()):
        return FeasibleCount(-math.inf, True)
    active = [m for m, lim in lims.items() if _high(layers[m]) > lim + tols[m]]
    if not active:
        return FeasibleCount(math.fsum(math.log10(k) for k in sizes), True)
    rooms = {m: lims[m] - _low(layers[m]) + tols[m] for m in active}
    if len(active) == 1:
        exact = _integer_units(layers[active[0]], rooms[active[0]], max_buckets)
        if exact:
            return FeasibleCount(_count_table(*exact, keep=False)[0], True)
    if math.prod(sizes) <= max_enumerate:
        mask = np.ones(math.prod(sizes), dtype=bool)
        for m in active:
            mask &= _enumerate(layers[m]) <= lims[m] + tols[m]
        hits = int(np.count_nonzero(mask))
        return FeasibleCount(math.log10(hits) if hits else -math.inf, True)
    return _estimate(layers, lims, tols, rooms, active, samples, seed)


def _estimate(
    layers: dict[str, Layers],
    lims: dict[str, float],
    tols: dict[str, float],
    rooms: dict[str, float],
    active: list[str],
    samples: int,
    seed: int,
) -> FeasibleCount:
    """Superset count on the most selective limit times the sampled pass rate."""
    if samples < 1:
        raise SmpqError(f"samples must be at least 1, got {samples}")
    grids = {m: _grid(layers[m], rooms[m], SAMPLE_BUCKETS) for m in active}
    sizes = {m: _count_table(grids[m][0], grids[m][1], keep=False)[0] for m in active}
    pivot = min(active, key=sizes.__getitem__)
    units, cap, _ = grids[pivot]
    log_super, tables = _count_table(units, cap, keep=True)
    choice = _sample(units, cap, tables, samples, np.random.default_rng(seed))
    ok = np.ones(samples, dtype=bool)
    for m in active:
        ok &= _policy_totals(layers[m], choice) <= lims[m] + tols[m]
    hits = int(np.count_nonzero(ok))
    if not hits:
        return FeasibleCount(-math.inf, False, math.inf)
    rate = hits / samples
    return FeasibleCount(
        log_super + math.log10(rate), False, math.sqrt((1 - rate) / (rate * samples))
    )


# ---------------------------------------------------------------------------- pareto


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Indices of the (score, cost) points no other point beats, in increasing cost.

    A point is dominated by one with score >= and cost <= (one strictly); of exact duplicates
    only the lowest index is kept, so a plot draws each corner once.
    """
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError):
        raise SmpqError("pareto_front needs (score, cost) pairs") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise SmpqError(f"pareto_front needs an (n, 2) array of (score, cost), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise SmpqError("pareto_front needs finite (score, cost) pairs")
    order = np.lexsort((np.arange(len(arr)), -arr[:, 0], arr[:, 1]))
    keep: list[int] = []
    best = -math.inf
    for i in order:
        if arr[i, 0] > best:
            keep.append(int(i))
            best = arr[i, 0]
    return np.array(keep, dtype=np.int64)
