"""Random search and the exhaustive oracle: policies scored directly, post-training.

Random search draws feasible policies *uniformly* (`smpq.alloc.sample_feasible`: a dynamic
program over a superset on a grid, each draw checked exactly against every limit). Distinct
policies are scored until `n_evaluations` forward passes are spent; the best on validation
wins.

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

from smpq import alloc
from smpq.alloc.problem import tolerance
from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.harness import CostTables, Meter, PolicyEvaluator, SearchSpace, cost_tables
from smpq.cnn.search.tasks import Backend, policy_evaluator, track
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.evaluator import EvaluatorConfig
from smpq.spec import LayerChoice, QuantSpec
from smpq.strategy import MAX_EVALUATIONS

__all__ = ["MAX_ENUMERATE", "MAX_ORACLE_POLICIES", "PolicyTable", "enumerate_feasible",
           "oracle", "random_search", "sample_feasible"]

MAX_ORACLE_POLICIES = 50_000
MAX_ENUMERATE = 100_000_000  # enumerated in chunks, only feasible rows kept
BUCKETS = 2_000


# -- feasible policies (the shared sampler and enumerator of smpq.alloc.feasible) -----------

def sample_feasible(tables: CostTables, n: int, rng: np.random.Generator,
                    buckets: int = BUCKETS, max_rounds: int = 1000) -> np.ndarray:
    """n policies (n, layers) drawn uniformly, with replacement, from the feasible set."""
    costs, limits, scales = tables.units()
    if not limits:
        layers, k = next(iter(tables.costs.values())).shape
        return rng.integers(0, k, size=(n, layers))
    return alloc.sample_feasible(costs, limits, n, rng, buckets=buckets, max_rounds=max_rounds,
                                 scales=scales)


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
            ok &= self.costs[m] <= lim + tolerance(lim)
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
    costs, limits, scales = tables.units()
    if not limits:  # no budget: every policy, still refusing large spaces
        costs = {m: list(c) for m, c in tables.costs.items()}
    return alloc.enumerate_feasible(costs, limits, max_policies=max_policies,
                                    max_enumerate=max_enumerate, chunk=chunk, scales=scales)


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


def _evaluator(ev, model, train_set, val_set, metric, backend, val_samples, seed, meter):
    """The batch evaluator of `backend` (local: the driver's `ev` itself), counted by meter."""
    evaluate = policy_evaluator(ev, model, train_set, val_set, metric,
                                {"backend": backend or EvaluatorConfig()}, val_samples, seed)
    track(meter, evaluate)
    return evaluate


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
    backend: EvaluatorConfig | Backend | None = None,
) -> StrategyResult:
    """Best of `n_evaluations` distinct uniformly drawn feasible policies, on validation.

    Fewer are scored when the feasible set is smaller (drawing stops after 50 x n draws).
    Each draw's new policies are scored as one batch on `backend` (`smpq.evaluator`).
    """
    if not 1 <= n_evaluations <= MAX_EVALUATIONS:
        raise SmpqError(f"n_evaluations must be in 1..{MAX_EVALUATIONS}, got {n_evaluations}")
    space, tables, meter, ev = _setup(model, cost, budget, train_set, val_set, w_specs,
                                      a_specs, fixed, val_samples, seed, evaluator)
    rng = np.random.default_rng(seed)
    seen: dict[tuple[int, ...], float] = {}
    draws = 0
    with _evaluator(ev, model, train_set, val_set, metric, backend, val_samples, seed,
                    meter) as evaluate:
        while len(seen) < n_evaluations and draws < 50 * n_evaluations:
            batch = sample_feasible(tables, min(n_evaluations, 256), rng)
            fresh: dict[tuple[int, ...], None] = {}
            for c in map(tuple, batch.tolist()):
                draws += 1
                if c not in seen:
                    fresh.setdefault(c)
                if len(seen) + len(fresh) >= n_evaluations:
                    break
            if fresh:
                seen.update(zip(fresh, evaluate(np.array(list(fresh))).tolist(), strict=True))
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
    backend: EvaluatorConfig | Backend | None = None,
) -> StrategyResult:
    """Score every feasible policy (`budget=None`: every policy); refuse large spaces.

    info["table"] is `PolicyTable.to_dict()` (rebuild with `PolicyTable.from_dict`);
    info["best_row"] is the row of the returned policy.
    """
    space, tables, meter, ev = _setup(model, cost, budget, train_set, val_set, w_specs,
                                      a_specs, fixed, val_samples, seed, evaluator)
    choices = enumerate_feasible(tables, max_policies)
    with _evaluator(ev, model, train_set, val_set, metric, backend, val_samples, seed,
                    meter) as evaluate:
        values = evaluate(choices)
    table = PolicyTable(space.names, _labels(space), choices, values,
                        tables.totals(choices), metric)
    row = table.best()
    info = {"table": table.to_dict(), "best_row": row, "best_value": float(values[row]),
            "n_policies": len(choices), "log10_space": math.log10(space.n_pairs)
            * len(space.names)}
    return meter.result("oracle", space.policy(choices[row]), info)
