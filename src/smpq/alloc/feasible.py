"""The feasible policies of an allocation problem: count them, sample them, enumerate them.

One dynamic program serves all three. Each limited metric's costs above every unit's cheapest
choice are put on an integer grid of the headroom: exactly when they are integers on a gcd
grid (`_integer_units`), otherwise rounded *down* onto `buckets` steps (`_floor_units`), which
keeps every feasible policy feasible on the grid (a superset). Cumulative counts over the
grid give the number of (superset) policies and let `_sample` draw from them exactly
uniformly, unit by unit from the last; each draw is then checked exactly (`Problem.fits`) and
rejected if it breaks a limit, so accepted draws are uniform over the feasible set. With
several limits the grid metric is the one whose superset is smallest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smpq.alloc.problem import REL_TOL, Layers, Problem
from smpq.errors import SmpqError

__all__ = ["FeasibleCount", "count_feasible", "enumerate_feasible", "pareto_front",
           "sample_feasible"]

MAX_ENUMERATE = 2_000_000  # count_feasible enumerates up to this many policies
MAX_BUCKETS = 100_000
SAMPLE_BUCKETS = 10_000  # grid of count_feasible's estimate
DRAW_BUCKETS = 2_000  # grid of sample_feasible


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


# ---------------------------------------------------------------------------- the grid


def _integer_units(layers: Layers, room: float, max_buckets: int
                   ) -> tuple[list[np.ndarray], int] | None:
    """Exact integer units when costs above each unit's cheapest are integers on a grid.

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
    """Costs above each unit's cheapest, rounded *down* onto `buckets` steps of the headroom
    (a sum of floors <= the floor of the sum: every feasible policy stays feasible)."""
    step = max(room, 1e-300) / buckets
    units = [np.floor((a - np.min(a)) / step * (1 - 1e-12)).astype(np.int64) for a in layers]
    return units, buckets


def _grid(layers: Layers, room: float, buckets: int) -> tuple[list[np.ndarray], int, bool]:
    exact = _integer_units(layers, room, buckets)
    return (*exact, True) if exact else (*_floor_units(layers, room, buckets), False)


def _count_table(units: list[np.ndarray], cap: int, keep: bool) -> tuple[float, list[np.ndarray]]:
    """log10 #policies with total units <= cap, by DP over cumulative counts.

    tables[l][t] is proportional to the number of ways units < l total at most t; each
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


def _sample(units: list[np.ndarray], cap: int, tables: list[np.ndarray], n: int,
            rng: np.random.Generator) -> np.ndarray:
    """n policies drawn uniformly from those with total units <= cap, shape (n, U)."""
    remaining = np.full(n, cap, dtype=np.int64)
    choice = np.empty((n, len(units)), dtype=np.int64)
    for unit in reversed(range(len(units))):
        u = units[unit]
        idx = remaining[:, None] - u[None, :]
        weights = np.where(idx >= 0, tables[unit][np.clip(idx, 0, cap)], 0.0)
        cum = np.cumsum(weights, axis=1)
        pick = np.sum(cum < rng.random(n)[:, None] * cum[:, -1:], axis=1)
        pick = np.minimum(pick, u.size - 1)
        choice[:, unit] = pick
        remaining -= u[pick]
    return choice


def _policy_totals(layers: Layers, choice: np.ndarray) -> np.ndarray:
    """Totals for a batch of policies (n, U)."""
    width = max(a.size for a in layers)
    padded = np.zeros((len(layers), width))
    for unit, a in enumerate(layers):
        padded[unit, : a.size] = a
    return padded[np.arange(len(layers)), choice].sum(axis=1)


def _fits(p: Problem, metrics: Sequence[str], choice: np.ndarray) -> np.ndarray:
    """Mask of the policies (n, U) that meet every limit in `metrics`."""
    ok = np.ones(len(choice), dtype=bool)
    for m in metrics:
        ok &= _policy_totals(p.costs[m], choice) <= p.limits[m] + p.tols[m]
    return ok


def _pivot(log_sizes: Mapping[str, float]) -> str:
    """The metric with the smallest superset; equal sizes (up to rounding) go to the first."""
    names = list(log_sizes)
    best = names[0]
    for m in names[1:]:
        if log_sizes[m] < log_sizes[best] - 1e-12:
            best = m
    return best


def _room(p: Problem, m: str) -> float:
    """Headroom of a limit above the cheapest total, slack included."""
    return p.limits[m] - math.fsum(float(np.min(a)) for a in p.costs[m]) + p.tols[m]


# ---------------------------------------------------------------------------- count


def count_feasible(
    costs: Mapping[str, Sequence[np.ndarray]],
    limits: Mapping[str, float],
    *,
    samples: int = 20_000,
    seed: int = 0,
    max_buckets: int = MAX_BUCKETS,
    max_enumerate: int = MAX_ENUMERATE,
    scales: Mapping[str, float] | None = None,
) -> FeasibleCount:
    """How many policies fit the budget, as log10: the size of the search space SMPQ faces.

    Exact when only one limit can bind and its costs above each unit's cheapest are integers
    whose gcd grid spans at most `max_buckets` steps of the headroom (DP over cost), or when
    there are at most `max_enumerate` policies (enumeration). Otherwise an unbiased estimate:
    the DP on the most selective limit counts a superset of the feasible policies; uniform
    samples from it are checked exactly against every limit, and the count is the superset
    size times the fraction that pass.
    """
    if not costs:
        raise SmpqError("count_feasible needs at least one cost metric to know the layers")
    p = Problem.build(costs, limits, None, scales)
    sizes = p.sizes
    if p.unreachable():
        return FeasibleCount(-math.inf, True)
    active = list(p.active())
    if not active:
        return FeasibleCount(math.fsum(math.log10(k) for k in sizes), True)
    rooms = {m: _room(p, m) for m in active}
    if len(active) == 1:
        exact = _integer_units(p.costs[active[0]], rooms[active[0]], max_buckets)
        if exact:
            return FeasibleCount(_count_table(*exact, keep=False)[0], True)
    if math.prod(sizes) <= max_enumerate:
        hits = sum(int(np.count_nonzero(_fits(p, active, c))) for c in _chunks(sizes))
        return FeasibleCount(math.log10(hits) if hits else -math.inf, True)
    if samples < 1:
        raise SmpqError(f"samples must be at least 1, got {samples}")
    grids = {m: _grid(p.costs[m], rooms[m], SAMPLE_BUCKETS) for m in active}
    supersets = {m: _count_table(grids[m][0], grids[m][1], keep=False)[0] for m in active}
    units, cap, _ = grids[_pivot(supersets)]
    log_super, tables = _count_table(units, cap, keep=True)
    ok = _fits(p, active, _sample(units, cap, tables, samples, np.random.default_rng(seed)))
    hits = int(np.count_nonzero(ok))
    if not hits:
        return FeasibleCount(-math.inf, False, math.inf)
    rate = hits / samples
    return FeasibleCount(
        log_super + math.log10(rate), False, math.sqrt((1 - rate) / (rate * samples))
    )


# ---------------------------------------------------------------------------- sample


def sample_feasible(
    costs: Mapping[str, Sequence[np.ndarray]],
    limits: Mapping[str, float],
    n: int,
    rng: np.random.Generator,
    *,
    buckets: int = DRAW_BUCKETS,
    max_rounds: int = 1000,
    scales: Mapping[str, float] | None = None,
) -> np.ndarray:
    """n policies (n, U) drawn uniformly, with replacement, from the feasible set."""
    p = Problem.build(costs, limits, None, scales)
    sizes = p.sizes
    active = p.active()
    if not active:
        if len(set(sizes)) == 1:
            return rng.integers(0, sizes[0], size=(n, len(sizes)))
        return rng.integers(0, np.asarray(sizes), size=(n, len(sizes)))
    grids = {}
    for m in active:
        units, cap = _floor_units(p.costs[m], _room(p, m), buckets)
        log_super, tables = _count_table(units, cap, keep=True)
        grids[m] = (log_super, units, tables)
    _, units, tables = grids[_pivot({m: g[0] for m, g in grids.items()})]
    kept: list[np.ndarray] = []
    have = 0
    for _ in range(max_rounds):
        draw = _sample(units, buckets, tables, max(2 * (n - have), 16), rng)
        ok = draw[_fits(p, active, draw)]
        kept.append(ok[: n - have])
        have += len(kept[-1])
        if have >= n:
            return np.concatenate(kept)
    raise SmpqError("could not draw feasible policies: the budget admits almost none")


# ---------------------------------------------------------------------------- enumerate


def _chunks(sizes: tuple[int, ...], chunk: int = 1 << 20):
    """Every policy (n, U) in product order (last unit fastest), `chunk` rows at a time."""
    n = math.prod(sizes)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        yield np.stack(np.unravel_index(idx, sizes), axis=1)


def enumerate_feasible(
    costs: Mapping[str, Sequence[np.ndarray]],
    limits: Mapping[str, float],
    *,
    max_policies: int | None = None,
    max_enumerate: int = 100_000_000,
    chunk: int = 1 << 20,
    scales: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Every feasible choice (n, U), in product order (last unit varies fastest).

    Enumerates in chunks; raises SmpqError as soon as more than `max_policies` are feasible.
    """
    p = Problem.build(costs, limits, None, scales)
    sizes = p.sizes
    n = math.prod(sizes)
    if n > max_enumerate:
        raise SmpqError(f"the space holds {n:.3g} policies, more than {max_enumerate:.3g} "
                        "can be enumerated; use fewer layers or candidates")
    active = p.active()
    kept, have = [], 0
    for choices in _chunks(sizes, chunk):
        kept.append(choices[_fits(p, active, choices)])
        have += len(kept[-1])
        if max_policies is not None and have > max_policies:
            raise SmpqError(f"more than {max_policies} feasible policies, the oracle's limit; "
                            "use a smaller model, fewer candidates or a tighter budget")
    return np.concatenate(kept)


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
