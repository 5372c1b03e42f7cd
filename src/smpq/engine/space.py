"""The space an allocator searches: units, each a grid of ordered ladders, with costs and limits.

A *unit* is what gets one candidate: a CNN layer (its candidates are (weight, activation)
pairs, a 2-D grid of two ladders) or a transformer share group (a 1-D ladder of weight
formats). Ladders are ordered from the cheapest level (0) to the richest. A unit's choice is
the C-order index of its level tuple in the grid, so a CNN pair (i, j) is `i * n_act + j`,
the convention of `cnn.search.harness.SearchSpace`.

| name      | what                                                                   |
|-----------|------------------------------------------------------------------------|
| dim       | one ladder of one unit, e.g. (layer 3, weights)                        |
| step      | player (unit, dim, k), k >= 1: "this ladder is at level k or above"    |
| deficit   | (top level - level) / top level of a dim, in [0, 1]                    |

A coalition of steps maps to a policy by counting: a dim's level is the number of its steps
present. Every coalition is therefore a deployable policy (one candidate per unit), which
is the point of the game: no mixtures, no renormalisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from smpq.alloc.problem import tolerance
from smpq.errors import SmpqError

__all__ = ["PolicySpace"]


@dataclass(frozen=True)
class PolicySpace:
    """Units with grids of ladders, per-choice costs under every metric, and limits.

    `costs[m][u][c]` is unit u's cost of choice c under metric m; a policy's total is the
    sum over units plus `offsets[m]` (fixed layers, constant parts). `limits` are totals.
    """

    units: tuple[str, ...]
    grids: tuple[tuple[int, ...], ...]
    costs: Mapping[str, tuple[np.ndarray, ...]]
    offsets: Mapping[str, float] = field(default_factory=dict)
    limits: Mapping[str, float] = field(default_factory=dict)
    dim_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.units:
            raise SmpqError("the policy space has no units")
        if len(self.grids) != len(self.units):
            raise SmpqError("one grid per unit is needed")
        for u, grid in zip(self.units, self.grids, strict=True):
            if not grid or any(int(k) < 1 for k in grid):
                raise SmpqError(f"unit {u!r}: every ladder needs at least one level")
        for m, per_unit in self.costs.items():
            if len(per_unit) != len(self.units):
                raise SmpqError(f"metric {m!r}: one cost row per unit is needed")
            for u, row, grid in zip(self.units, per_unit, self.grids, strict=True):
                if np.asarray(row).shape != (int(np.prod(grid)),):
                    raise SmpqError(f"metric {m!r}, unit {u!r}: one cost per choice is needed")
        unknown = set(self.limits) - set(self.costs)
        if unknown:
            raise SmpqError(f"limits for metrics without costs: {sorted(unknown)}")

    # ----------------------------------------------------------------- structure

    @property
    def n_units(self) -> int:
        return len(self.units)

    def n_choices(self, u: int) -> int:
        return int(np.prod(self.grids[u]))

    @cached_property
    def dims(self) -> tuple[tuple[int, int], ...]:
        """(unit, dim) of every ladder with more than one level, in unit order."""
        return tuple((u, d) for u, g in enumerate(self.grids) for d, k in enumerate(g) if k > 1)

    @cached_property
    def players(self) -> tuple[tuple[int, int, int], ...]:
        """(unit, dim, k) for every step k >= 1 of every ladder."""
        return tuple((u, d, k) for u, d in self.dims for k in range(1, self.grids[u][d]))

    @cached_property
    def player_dim(self) -> np.ndarray:
        """Index into `dims` of each player's ladder."""
        index = {ud: j for j, ud in enumerate(self.dims)}
        return np.array([index[(u, d)] for u, d, _ in self.players], dtype=np.int64)

    @cached_property
    def _level_table(self) -> tuple[np.ndarray, ...]:
        """Per unit: (n_choices, n_dims_of_unit) level of each dim at each choice."""
        return tuple(np.stack(np.unravel_index(np.arange(int(np.prod(g))), g), axis=1)
                     for g in self.grids)

    def levels(self, choices: np.ndarray) -> np.ndarray:
        """(n, units) choices -> (n, len(dims)) ladder levels."""
        choices = self._as_choices(choices)
        cols = [self._level_table[u][choices[:, u], d] for u, d in self.dims]
        return np.stack(cols, axis=1) if cols else np.zeros((len(choices), 0), dtype=np.int64)

    def from_levels(self, levels: np.ndarray) -> np.ndarray:
        """(n, len(dims)) ladder levels -> (n, units) choices (dims of one level sit at 0)."""
        levels = np.atleast_2d(np.asarray(levels, dtype=np.int64))
        full = [np.zeros((len(levels), len(g)), dtype=np.int64) for g in self.grids]
        for j, (u, d) in enumerate(self.dims):
            full[u][:, d] = levels[:, j]
        return np.stack([np.ravel_multi_index(tuple(f.T), g) for f, g in
                         zip(full, self.grids, strict=True)], axis=1)

    @cached_property
    def tops(self) -> np.ndarray:
        """The highest level of every dim."""
        return np.array([self.grids[u][d] - 1 for u, d in self.dims], dtype=np.int64)

    def deficits(self, choices: np.ndarray) -> np.ndarray:
        """(n, len(dims)) share of each ladder's steps that are missing, in [0, 1]."""
        return (self.tops - self.levels(choices)) / np.maximum(self.tops, 1)

    def coalition_levels(self, masks: np.ndarray) -> np.ndarray:
        """(n, players) boolean coalitions -> (n, len(dims)) levels (count of steps present)."""
        masks = np.atleast_2d(np.asarray(masks, dtype=bool))
        out = np.zeros((len(masks), len(self.dims)), dtype=np.int64)
        for j in range(len(self.dims)):
            out[:, j] = masks[:, self.player_dim == j].sum(axis=1)
        return out

    # ----------------------------------------------------------------- costs

    def _as_choices(self, choices: np.ndarray) -> np.ndarray:
        choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        if choices.shape[1] != self.n_units:
            raise SmpqError(f"a policy needs {self.n_units} choices, got {choices.shape[1]}")
        return choices

    def totals(self, choices: np.ndarray) -> dict[str, np.ndarray]:
        """{metric: (n,)} full totals of a batch of choices."""
        choices = self._as_choices(choices)
        out = {}
        for m, per_unit in self.costs.items():
            tot = np.full(len(choices), float(self.offsets.get(m, 0.0)))
            for u, row in enumerate(per_unit):
                tot += np.asarray(row, float)[choices[:, u]]
            out[m] = tot
        return out

    def tolerance(self, metric: str) -> float:
        """The one tolerance (`smpq.alloc.problem`): a full-total limit, as `Budget.check`."""
        return tolerance(float(self.limits[metric]))

    def fits(self, choices: np.ndarray) -> np.ndarray:
        """Boolean mask of the choices that meet every limit."""
        choices = self._as_choices(choices)
        ok = np.ones(len(choices), dtype=bool)
        if not self.limits:
            return ok
        tot = self.totals(choices)
        for m, lim in self.limits.items():
            ok &= tot[m] <= float(lim) + self.tolerance(m)
        return ok

    def cheapest(self) -> np.ndarray:
        """The all-lowest policy (level 0 on every ladder)."""
        return np.zeros(self.n_units, dtype=np.int64)

    def richest(self) -> np.ndarray:
        return np.array([self.n_choices(u) - 1 for u in range(self.n_units)], dtype=np.int64)

    def check_feasible(self) -> None:
        """A one-line error when not even the per-metric cheapest totals meet the limits."""
        for m, lim in self.limits.items():
            low = float(self.offsets.get(m, 0.0)) + sum(float(np.min(r)) for r in self.costs[m])
            if low > float(lim) + self.tolerance(m):
                raise SmpqError(f"budget infeasible: {m} limit {float(lim):.6g} is below the "
                                f"cheapest reachable {low:.6g}")

    # ----------------------------------------------------------------- sampling

    def random_maximal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Random policies on the budget frontier: steps added in random order while they fit.

        Starts at the all-lowest policy and raises one ladder step at a time, in a random
        order of the steps, skipping a step that would break a limit; so every result meets
        the budget and no single remaining step can be added.
        """
        out = np.empty((n, self.n_units), dtype=np.int64)
        for i in range(n):
            levels = np.zeros(len(self.dims), dtype=np.int64)
            order = rng.permutation(len(self.players))
            owner = self.player_dim
            progress = True
            while progress:
                progress = False
                for p in order:
                    j = owner[p]
                    if levels[j] >= self.tops[j]:
                        continue
                    levels[j] += 1
                    if self.fits(self.from_levels(levels))[0]:
                        progress = True
                    else:
                        levels[j] -= 1
            out[i] = self.from_levels(levels)[0]
        return out

    def random_ladder(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Random coalitions of the ladder game as level vectors, in antithetic pairs.

        Each draw picks a uniform coalition size and a uniform random set of that many steps
        (the count per ladder is its level); its partner is the mirrored policy
        (top - level on every ladder), the complement coalition.
        """
        n_players = len(self.players)
        owner = self.player_dim
        out = []
        while len(out) < n:
            size = int(rng.integers(0, n_players + 1))
            mask = np.zeros(n_players, dtype=bool)
            mask[rng.choice(n_players, size=size, replace=False)] = True
            lv = np.bincount(owner[mask], minlength=len(self.dims))
            out.append(lv)
            out.append(self.tops - lv)
        return self.from_levels(np.array(out[:n]))

    def with_limits(self, limits: Mapping[str, float]) -> PolicySpace:
        return PolicySpace(self.units, self.grids, self.costs, self.offsets, dict(limits),
                           self.dim_names)
