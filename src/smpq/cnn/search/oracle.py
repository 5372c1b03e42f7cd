"""Random search and the exhaustive oracle: policies scored directly, post-training.

Random search draws feasible policies *uniformly*: a dynamic program over one limited
metric, with every layer's cost (above its cheapest choice) rounded down onto a grid of
`buckets` steps of the headroom, counts and samples a superset of the feasible policies
exactly uniformly (rounding down never drops a feasible policy); each draw is then checked
exactly against every limit and rejected if it breaks one. Accepted draws are uniform over
the feasible set. The grid metric is the one whose superset is smallest. Distinct policies
are scored until `n_evaluations` forward passes are spent; the best on validation wins.

The oracle enumerates every feasible policy of a small space and scores each one, which
gives the best policy by validation value and the full table (policy index -> value, costs)
that benchmarks need for regret, for finetuning a sample, and for the interaction analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.harness import CostTables, Meter, PolicyEvaluator, SearchSpace, cost_tables
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.spec import LayerChoice, QuantSpec

__all__ = ["MAX_ENUMERATE", "MAX_ORACLE_POLICIES", "PolicyTable", "enumerate_feasible",
           "oracle", "random_search", "sample_feasible"]

MAX_ORACLE_POLICIES = 50_000
MAX_ENUMERATE = 100_000_000  # enumerated in chunks, only feasible rows kept
BUCKETS = 2_000


# -- uniform feasible sampling --------------------------------------------------------------

def _grid(costs: np.ndarray, room: float, buckets: int) -> np.ndarray:
    """Integer units per (layer, pair), rounded down: a sum of floors <= floor of the sum."""
    shifted = costs - costs.min(axis=1, keepdims=True)
    step = max(room, 1e-300) / buckets
    return np.floor(shifted / step * (1 - 1e-12)).astype(np.int64)


def _cumulative_counts(units: np.ndarray, cap: int) -> list[np.ndarray]:
    """C[l][t] = number of choices for layers < l with total units <= t (float64)."""
    exact = np.zeros(cap + 1)
    exact[0] = 1.0
    out = [np.cumsum(exact)]
    for u in units:
        new = np.zeros(cap + 1)
        for v in u[u <= cap]:
            new[v:] += exact[: cap + 1 - v]
        exact = new
        out.append(np.cumsum(exact))
    return out


def _draw(units: np.ndarray, cap: int, counts: list[np.ndarray], n: int,
          rng: np.random.Generator) -> np.ndarray:
    """n policies uniform among those with total units <= cap, shape (n, layers)."""
    layers, k = units.shape
    remaining = np.full(n, cap, dtype=np.int64)
    out = np.empty((n, layers), dtype=np.int64)
    for li in reversed(range(layers)):
        idx = remaining[:, None] - units[li][None, :]
        w = np.where(idx >= 0, counts[li][np.clip(idx, 0, cap)], 0.0)
        cum = np.cumsum(w, axis=1)
        pick = np.minimum(np.sum(cum < rng.random(n)[:, None] * cum[:, -1:], axis=1), k - 1)
        out[:, li] = pick
        remaining -= units[li][pick]
    return out


def sample_feasible(tables: CostTables, n: int, rng: np.random.Generator,
                    buckets: int = BUCKETS, max_rounds: int = 1000) -> np.ndarray:
    """n policies (n, layers) drawn uniformly, with replacement, from the feasible set."""
    layers, k = next(iter(tables.costs.values())).shape
    active = {m: lim for m, lim in tables.limits.items()
              if tables.costs[m].max(axis=1).sum() + tables.offsets[m] > lim * (1 + 1e-9)}
    if not active:
        return rng.integers(0, k, size=(n, layers))
    grids = {}
    for m, lim in active.items():
        room = lim * (1 + 1e-9) - tables.offsets[m] - tables.costs[m].min(axis=1).sum()
        units = _grid(tables.costs[m], room, buckets)
        counts = _cumulative_counts(units, buckets)
        grids[m] = (counts[-1][buckets], units, counts)
    _, units, counts = min(grids.values(), key=lambda g: g[0])
    kept: list[np.ndarray] = []
    have = 0
    for _ in range(max_rounds):
        draw = _draw(units, buckets, counts, max(2 * (n - have), 16), rng)
        ok = draw[tables.feasible(draw)]
        kept.append(ok[: n - have])
        have += len(kept[-1])
        if have >= n:
            return np.concatenate(kept)
    raise SmpqError("could not draw feasible policies: the budget admits almost none")


# -- the policy table -----------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyTable:
    """Scored policies: row r is policy r, `choices[r]` its pair index per searched layer."""

    names: tuple[str, ...]
    pairs: tuple[str, ...]  # labels of the pair indices, e.g. "W4/A3"
    choices: np.ndarray  # (n, layers) int
    values: np.ndarray  # (n,)
    costs: dict[str, np.ndarray] = field(default_factory=dict)  # full metrics, (n,) each
    metric: str = "acc"

    def feasible(self, limits: Mapping[str, float]) -> np.ndarray:
        ok = np.ones(len(self.values), dtype=bool)
        for m, lim in limits.items():
            ok &= self.costs[m] <= lim * (1 + 1e-9)
        return ok

    def best(self, mask: np.ndarray | None = None) -> int:
        """Row of the highest value (among `mask`); ties go to the first row."""
        v = self.values if mask is None else np.where(mask, self.values, -np.inf)
        if mask is not None and not mask.any():
            raise SmpqError("no policy in the table meets these limits")
        return int(np.argmax(v))

    def lookup(self, choice: Sequence[int]) -> int | None:
        rows = np.flatnonzero((self.choices == np.asarray(choice)[None, :]).all(axis=1))
        return int(rows[0]) if rows.size else None

    def to_dict(self) -> dict:
        return {"names": list(self.names), "pairs": list(self.pairs), "metric": self.metric,
                "choices": self.choices.tolist(), "values": self.values.tolist(),
                "costs": {m: c.tolist() for m, c in self.costs.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> PolicyTable:
        try:
            return cls(tuple(d["names"]), tuple(d["pairs"]),
                       np.asarray(d["choices"], dtype=np.int64).reshape(-1, len(d["names"])),
                       np.asarray(d["values"], dtype=float),
                       {m: np.asarray(c, dtype=float) for m, c in d.get("costs", {}).items()},
                       d.get("metric", "acc"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SmpqError(f"not a policy table: {exc}") from None


def _labels(space: SearchSpace) -> tuple[str, ...]:
    return tuple(f"W{w.bits}/A{a.bits}" for w in space.w_specs for a in space.a_specs)


def enumerate_feasible(tables: CostTables, max_policies: int | None = None,
                       max_enumerate: int = MAX_ENUMERATE, chunk: int = 1 << 20) -> np.ndarray:
    """Every feasible choice (n, layers), in product order (last layer varies fastest).

    Enumerates in chunks; raises SmpqError as soon as more than `max_policies` are feasible.
    """
    layers, k = next(iter(tables.costs.values())).shape
    total = k**layers
    if total > max_enumerate:
        raise SmpqError(f"the space holds {total:.3g} policies, more than {max_enumerate:.3g} "
                        "can be enumerated; use fewer layers or candidates")
    kept, have = [], 0
    for start in range(0, total, chunk):
        idx = np.arange(start, min(start + chunk, total))
        choices = np.stack(np.unravel_index(idx, (k,) * layers), axis=1)
        kept.append(choices[tables.feasible(choices)])
        have += len(kept[-1])
        if max_policies is not None and have > max_policies:
            raise SmpqError(f"more than {max_policies} feasible policies, the oracle's limit; "
                            "use a smaller model, fewer candidates or a tighter budget")
    return np.concatenate(kept)


# -- strategies -----------------------------------------------------------------------------

def _setup(model, cost, budget, train_set, val_set, w_specs, a_specs, fixed, val_samples,
           seed, evaluator):
    space = SearchSpace.build(cost, w_specs, a_specs, fixed)
    tables = cost_tables(space, cost, budget)
    meter = Meter(evaluator)
    ev = evaluator or PolicyEvaluator(model, space, train_set, val_set,
                                      val_samples=val_samples, seed=seed)
    if ev.space != space:
        raise SmpqError("the evaluator was built for another search space")
    meter.evaluator = ev
    return space, tables, meter, ev


def random_search(
    model: nn.Module,
    cost: ModelCost,
    budget: Budget,
    train_set: Dataset,
    val_set: Dataset,
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None] | None = None,
    *,
    n_evaluations: int = 100,
    metric: str = "acc",
    val_samples: int | None = None,
    seed: int = 0,
    evaluator: PolicyEvaluator | None = None,
) -> StrategyResult:
    """Best of `n_evaluations` distinct uniformly drawn feasible policies, on validation.

    Fewer are scored when the feasible set is smaller (drawing stops after 50 x n draws).
    """
    if n_evaluations < 1:
        raise SmpqError(f"n_evaluations must be >= 1, got {n_evaluations}")
    space, tables, meter, ev = _setup(model, cost, budget, train_set, val_set, w_specs,
                                      a_specs, fixed, val_samples, seed, evaluator)
    rng = np.random.default_rng(seed)
    seen: dict[tuple[int, ...], float] = {}
    draws = 0
    while len(seen) < n_evaluations and draws < 50 * n_evaluations:
        batch = sample_feasible(tables, min(n_evaluations, 256), rng)
        for c in map(tuple, batch.tolist()):
            draws += 1
            if c not in seen:
                seen[c] = ev.value(c, metric)
            if len(seen) >= n_evaluations:
                break
    best = max(seen, key=seen.__getitem__)
    info = {"scored": len(seen), "draws": draws, "best_value": seen[best], "metric": metric}
    return meter.result("random", space.policy(best), info)


def oracle(
    model: nn.Module,
    cost: ModelCost,
    budget: Budget | None,
    train_set: Dataset,
    val_set: Dataset,
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None] | None = None,
    *,
    metric: str = "acc",
    max_policies: int = MAX_ORACLE_POLICIES,
    val_samples: int | None = None,
    seed: int = 0,
    evaluator: PolicyEvaluator | None = None,
) -> StrategyResult:
    """Score every feasible policy (`budget=None`: every policy); refuse large spaces.

    info["table"] is `PolicyTable.to_dict()` (rebuild with `PolicyTable.from_dict`);
    info["best_row"] is the row of the returned policy.
    """
    space, tables, meter, ev = _setup(model, cost, budget, train_set, val_set, w_specs,
                                      a_specs, fixed, val_samples, seed, evaluator)
    choices = enumerate_feasible(tables, max_policies)
    values = ev.values(choices, metric)
    table = PolicyTable(space.names, _labels(space), choices, values,
                        tables.totals(choices), metric)
    row = table.best()
    info = {"table": table.to_dict(), "best_row": row, "best_value": float(values[row]),
            "n_policies": len(choices), "log10_space": math.log10(space.n_pairs)
            * len(space.names)}
    return meter.result("oracle", space.policy(choices[row]), info)
