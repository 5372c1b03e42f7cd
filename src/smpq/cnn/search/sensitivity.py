"""One-at-a-time sensitivity (AIMET AMP, Sony MCT style) with exact or greedy allocation.

Every searched layer is moved off a *reference* policy one candidate at a time and the drop
in post-training validation value is measured (PolicyValue, default metric "neg_loss", so
the drop is the loss increase). Weights and activations are measured separately: a weight
candidate with the layer's activation at the reference, and vice versa. Two references:

- "high": every searched layer at the highest weight and activation candidates;
- "low":  every searched layer at a low uniform pair (default 3/3, configurable).

The drops are additive scores (choice drop = weight drop + activation drop), allocated
exactly under the budget by `derive_budgeted`. The reference matters: from "high" one layer
at 2 bits looks harmless even where two of them together collapse the model, which is why
the benchmark runs both.

The greedy variant (AIMET's bit-lowering walk) starts from every layer at the highest
candidates and repeatedly lowers one layer's weight or activation by one candidate step,
taking the move with the smallest loss increase per saved cost, until every constraint holds.
Saved cost is summed over the violated constraints, each relative to its limit. The loss
increase of a move comes from the "high" one-at-a-time table (`mode="table"`, AIMET) or is
measured at the current policy (`mode="measured"`, up to 2 x layers evaluations per step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from smpq.alloc.problem import fits
from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.derive import derive_budgeted
from smpq.cnn.search.harness import (
    Choice,
    CostTables,
    Meter,
    PolicyEvaluator,
    SearchCost,
    SearchSpace,
    cost_tables,
)
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.spec import LayerChoice, QuantSpec

__all__ = ["GREEDY_MODES", "REFERENCES", "Sensitivity", "greedy", "oat_sensitivity",
           "one_at_a_time", "reference_choice"]

REFERENCES = ("high", "low")
GREEDY_MODES = ("table", "measured")


@dataclass(frozen=True)
class Sensitivity:
    """Value drop of each (layer, candidate) moved alone off a reference policy."""

    reference: str
    ref_indices: tuple[int, int]  # (weight, activation) candidate index of the reference
    ref_value: float
    metric: str
    drops: dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (weight drops, act drops)
    cost: SearchCost

    def to_dict(self) -> dict:
        return {"reference": self.reference, "ref_indices": list(self.ref_indices),
                "ref_value": self.ref_value, "metric": self.metric,
                "drops": {n: {"w": w.tolist(), "a": a.tolist()} for n, (w, a) in
                          self.drops.items()}}


def reference_choice(space: SearchSpace, reference: str,
                     low: tuple[int, int] = (3, 3)) -> tuple[int, int]:
    """(weight index, activation index) of the reference pair."""
    wb = [s.bits for s in space.w_specs]
    ab = [s.bits for s in space.a_specs]
    if reference == "high":
        return int(np.argmax(wb)), int(np.argmax(ab))
    if reference == "low":
        if low[0] not in wb or low[1] not in ab:
            raise SmpqError(f"low reference {low[0]}/{low[1]} is not a candidate pair "
                            f"(weights {wb}, activations {ab})")
        return wb.index(low[0]), ab.index(low[1])
    raise SmpqError(f"unknown reference {reference!r}; known: {', '.join(REFERENCES)}")


def _measure(ev: PolicyEvaluator, reference: str, ref: tuple[int, int],
             metric: str) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    space = ev.space
    base = [space.pair(*ref)] * len(space.names)
    v_ref = ev.value(base, metric)
    drops = {}
    for li, name in enumerate(space.names):
        dw = np.zeros(len(space.w_specs))
        da = np.zeros(len(space.a_specs))
        for i in range(len(dw)):
            moved = list(base)
            moved[li] = space.pair(i, ref[1])
            dw[i] = v_ref - ev.value(moved, metric)
        for j in range(len(da)):
            moved = list(base)
            moved[li] = space.pair(ref[0], j)
            da[j] = v_ref - ev.value(moved, metric)
        drops[name] = (dw, da)
    return v_ref, drops


def oat_sensitivity(
    model: nn.Module,
    cost: ModelCost,
    train_set: Dataset,
    val_set: Dataset,
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None] | None = None,
    *,
    reference: str = "high",
    low: tuple[int, int] = (3, 3),
    metric: str = "neg_loss",
    val_samples: int | None = None,
    seed: int = 0,
    evaluator: PolicyEvaluator | None = None,
) -> Sensitivity:
    """Measure the one-at-a-time drops: 1 + layers x (|W| - 1 + |A| - 1) evaluations."""
    space = SearchSpace.build(cost, w_specs, a_specs, fixed)
    ref = reference_choice(space, reference, low)
    meter = Meter(evaluator)
    ev = evaluator or PolicyEvaluator(model, space, train_set, val_set,
                                      val_samples=val_samples, seed=seed)
    if ev.space != space:
        raise SmpqError("the evaluator was built for another search space")
    meter.evaluator = ev  # evaluator built here: its calls all belong to this measurement
    v_ref, drops = _measure(ev, reference, ref, metric)
    return Sensitivity(reference, ref, v_ref, metric, drops, meter.cost())


def one_at_a_time(
    model: nn.Module,
    cost: ModelCost,
    budget: Budget,
    train_set: Dataset,
    val_set: Dataset,
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None] | None = None,
    *,
    reference: str = "high",
    low: tuple[int, int] = (3, 3),
    metric: str = "neg_loss",
    val_samples: int | None = None,
    seed: int = 0,
    sensitivity: Sensitivity | None = None,
    evaluator: PolicyEvaluator | None = None,
) -> StrategyResult:
    """Exact budgeted allocation of the one-at-a-time drops (score = -drop).

    A precomputed `sensitivity` is reused (and its measurement cost charged to the result).
    """
    sens = sensitivity or oat_sensitivity(
        model, cost, train_set, val_set, w_specs, a_specs, fixed, reference=reference, low=low,
        metric=metric, val_samples=val_samples, seed=seed, evaluator=evaluator)
    meter = Meter()
    space = SearchSpace.build(cost, w_specs, a_specs, fixed)
    if tuple(sens.drops) != space.names:
        raise SmpqError("the sensitivity was measured on other layers than this search")
    scores = {n: (-dw, -da) for n, (dw, da) in sens.drops.items()}
    d = derive_budgeted(cost, scores, w_specs, a_specs, budget, space.fixed, space.fixed)
    info = {"sensitivity": sens.to_dict(), "reused_sensitivity": sensitivity is not None,
            **d.summary()}
    return meter.result(f"oat_{sens.reference}", d.policy, info, extra=sens.cost)


# -- greedy bit lowering --------------------------------------------------------------------

def _moves(space: SearchSpace, state: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(layer, new weight index, new act index) for every one-step lowering."""
    w_order = np.argsort([s.bits for s in space.w_specs], kind="stable")
    a_order = np.argsort([s.bits for s in space.a_specs], kind="stable")
    w_rank = {int(k): r for r, k in enumerate(w_order)}
    a_rank = {int(k): r for r, k in enumerate(a_order)}
    out = []
    for li, (i, j) in enumerate(state):
        if w_rank[i] > 0:
            out.append((li, int(w_order[w_rank[i] - 1]), j))
        if a_rank[j] > 0:
            out.append((li, i, int(a_order[a_rank[j] - 1])))
    return out


def _choice(space: SearchSpace, state: list[tuple[int, int]]) -> Choice:
    return tuple(space.pair(i, j) for i, j in state)


def _violation(tables: CostTables, choice: Choice) -> dict[str, float]:
    """Excess over each violated limit (empty when every constraint holds)."""
    tot = tables.totals(np.array([choice]))
    ok = tables.feasible(np.array([choice]))[0]
    if ok:
        return {}
    return {m: float(tot[m][0]) - lim for m, lim in tables.limits.items()
            if not fits(float(tot[m][0]), lim)}


def greedy(
    model: nn.Module,
    cost: ModelCost,
    budget: Budget,
    train_set: Dataset,
    val_set: Dataset,
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None] | None = None,
    *,
    mode: str = "table",
    metric: str = "neg_loss",
    val_samples: int | None = None,
    seed: int = 0,
    sensitivity: Sensitivity | None = None,
    evaluator: PolicyEvaluator | None = None,
) -> StrategyResult:
    """Lower bits from all-highest, cheapest loss per saved cost first, until within budget."""
    if mode not in GREEDY_MODES:
        raise SmpqError(f"unknown greedy mode {mode!r}; known: {', '.join(GREEDY_MODES)}")
    space = SearchSpace.build(cost, w_specs, a_specs, fixed)
    tables = cost_tables(space, cost, budget)
    extra = SearchCost()
    ev = evaluator
    if mode == "table":
        if sensitivity is None:
            sensitivity = oat_sensitivity(model, cost, train_set, val_set, w_specs, a_specs,
                                          fixed, reference="high", metric=metric,
                                          val_samples=val_samples, seed=seed, evaluator=ev)
        elif sensitivity.reference != "high":
            raise SmpqError("the greedy walk starts from all-highest: use a 'high' sensitivity")
        extra = sensitivity.cost
    meter = Meter(ev if mode == "measured" else None)
    if mode == "measured" and ev is None:
        ev = PolicyEvaluator(model, space, train_set, val_set, val_samples=val_samples,
                             seed=seed)
        meter.evaluator = ev
    state = [reference_choice(space, "high")] * len(space.names)
    steps = []
    while excess := _violation(tables, _choice(space, state)):
        cur = _choice(space, state)
        best = None
        for li, i, j in _moves(space, state):
            nxt = list(state)
            nxt[li] = (i, j)
            new = _choice(space, nxt)
            saved = sum((tables.costs[m][li, cur[li]] - tables.costs[m][li, new[li]])
                        / tables.limits[m] for m in excess)
            if saved <= 0:
                continue
            if mode == "table":
                dw, da = sensitivity.drops[space.names[li]]
                pi, pj = state[li]
                increase = (dw[i] - dw[pi]) + (da[j] - da[pj])
            else:
                increase = ev.value(cur, metric) - ev.value(new, metric)
            key = increase / saved
            if best is None or key < best[0]:
                best = (key, li, i, j, increase)
        if best is None:
            raise SmpqError(f"greedy lowering cannot meet the budget {budget}")
        _, li, i, j, increase = best
        kind = "w" if i != state[li][0] else "a"
        state[li] = (i, j)
        steps.append({"layer": space.names[li], "kind": kind, "w_bits": space.w_specs[i].bits,
                      "a_bits": space.a_specs[j].bits, "increase": float(increase)})
    policy = space.policy(_choice(space, state))
    info = {"mode": mode, "steps": steps}
    if sensitivity is not None:
        info["sensitivity"] = sensitivity.to_dict()
    return meter.result(f"greedy_{mode}", policy, info, extra=extra)
