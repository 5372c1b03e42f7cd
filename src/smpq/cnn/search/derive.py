"""From per-candidate scores to a policy: argmax per layer, or exact allocation under a budget.

A layer's choice is a (weight candidate, activation candidate) pair; its score is the sum of
the two candidates' scores (contributions are additive over players), and its costs are the
cost model's per-layer terms. The budgeted derivation is the multiple-choice knapsack solved
exactly by `smpq.alloc.allocate_milp`, on the budget resolved once (`resolve_budget`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smpq.alloc import Allocation, allocate_milp
from smpq.cost import Budget, ModelCost, ResolvedBudget
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec

__all__ = ["Derivation", "argmax_within_budget", "derive_argmax", "derive_budgeted", "pair_scores",
           "resolve_budget"]


@dataclass(frozen=True)
class Derivation:
    policy: Policy
    allocation: Allocation | None
    repaired: bool = False  # argmax broke the budget and was replaced by the exact allocation

    def summary(self) -> dict:
        a = self.allocation
        return {
            "repaired": self.repaired,
            "binding": list(a.binding) if a else [],
            "tight": list(a.tight) if a else [],
            "solver_seconds": a.seconds if a else 0.0,
        }


def pair_scores(w_scores: np.ndarray, a_scores: np.ndarray) -> np.ndarray:
    """Score of every (w, a) pair, flattened w-major: s_w[i] + s_a[j]."""
    return (np.asarray(w_scores)[:, None] + np.asarray(a_scores)[None, :]).ravel()


def _pairs(w_specs: Sequence[QuantSpec], a_specs: Sequence[QuantSpec]) -> list[LayerChoice]:
    return [LayerChoice(w, a) for w in w_specs for a in a_specs]


def _full_policy(order: Sequence[str], searched: Mapping[str, LayerChoice],
                 fixed: Mapping[str, LayerChoice | None]) -> Policy:
    return Policy({n: searched[n] if n in searched else fixed.get(n) for n in order})


def derive_argmax(
    order: Sequence[str],
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None],
) -> Policy:
    """Per layer the weight and activation candidates with the largest score (EdMIPS)."""
    chosen = {
        n: LayerChoice(w_specs[int(np.argmax(sw))], a_specs[int(np.argmax(sa))])
        for n, (sw, sa) in scores.items()
    }
    return _full_policy(order, chosen, fixed)


def derive_budgeted(
    cost: ModelCost,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    budget: Budget,
    fixed: Mapping[str, LayerChoice | None],
    pinned_reference: Mapping[str, LayerChoice | None] | None = None,
    *,
    resolved: ResolvedBudget | None = None,
) -> Derivation:
    """Maximise the total score of the searched layers subject to every budget constraint.

    Fixed layers keep their choice; their cost is moved to the right-hand side. `resolved`
    (from `resolve_budget`) skips resolving the budget again.
    """
    pairs = _pairs(w_specs, a_specs)
    names = list(scores)
    if resolved is None:
        resolved = resolve_budget(cost, names, w_specs, a_specs, budget, fixed, pinned_reference)
    limits = resolved.unit_limits
    layer_scores = [pair_scores(*scores[n]) for n in names]
    costs = {m: [cost.choice_costs(n, pairs)[m] for n in names] for m in limits}
    alloc = allocate_milp(layer_scores, costs, limits, scales=resolved.scales)
    chosen = {n: pairs[k] for n, k in zip(names, alloc.choice, strict=True)}
    return Derivation(_full_policy(cost.names, chosen, fixed), alloc)


def resolve_budget(
    cost: ModelCost,
    names: Sequence[str],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    budget: Budget,
    fixed: Mapping[str, LayerChoice | None],
    pinned_reference: Mapping[str, LayerChoice | None] | None = None,
) -> ResolvedBudget:
    """The budget over the searched layers `names` (every candidate pair) and the fixed rest."""
    pairs = _pairs(w_specs, a_specs)
    rest = {n: c for n, c in fixed.items() if n not in names}
    return budget.resolve(cost, {n: pairs for n in names}, pinned_reference, rest)


def argmax_within_budget(
    cost: ModelCost,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    budget: Budget,
    fixed: Mapping[str, LayerChoice | None],
    pinned_reference: Mapping[str, LayerChoice | None] | None = None,
) -> Derivation:
    """EdMIPS derivation; if the argmax policy breaks the budget, fall back to the exact one."""
    resolved = resolve_budget(cost, list(scores), w_specs, a_specs, budget, fixed,
                              pinned_reference)
    pol = derive_argmax(cost.names, scores, w_specs, a_specs, fixed)
    if resolved.fits(cost, pol):
        return Derivation(pol, None)
    d = derive_budgeted(cost, scores, w_specs, a_specs, budget, fixed, pinned_reference,
                        resolved=resolved)
    return Derivation(d.policy, d.allocation, repaired=True)
