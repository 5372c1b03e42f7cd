"""The transformer allocation methods, registered for `smpq.strategy` (kind "transformer").

`problem.model` is a `PTQSession` (`prepare()`d before scoring) and `problem.w_specs` its
candidate formats. Each method scores every (group, candidate) and allocates the scores:

| name             | scores                                      | allocation                 |
|------------------|---------------------------------------------|----------------------------|
| shapley          | progressive-game Shapley values (ladder)    | exact MILP (pairwise with  |
|                  |                                             | `config.interactions`)     |
| shapley_pairwise | the same values                             | pairwise MILP              |
| shapley_literal  | Shapley values of the literal game          | exact MILP                 |
| uniform          | candidate ranks                             | highest uniform that fits  |
| hessian, fisher, | per-layer errors (smpq.transformer.scores)  | exact MILP                 |
| gradxdw, relerr  |                                             |                            |

Availability: a session's `allowed` (per group, the candidate indices its layers can store;
GGUF K-quants need rows of whole 256-blocks) restricts every allocation: the MILPs see only
the allowed choices of each group, uniform only the candidates every group allows. The
Shapley-game strategies need one ladder for all groups and refuse otherwise.

Options: `config` (MixedConfig; its seed is replaced by the problem's), `state_path` and
`resume` (Shapley sampling state); `scores` (+ `shapley_result`, `score_cost`) to allocate
precomputed scores without measuring anything, as `PTQSession.allocate` does.
`result.detail` is an `Allocated`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from smpq.alloc import Allocation, allocate_milp, allocate_quadratic, uniform_choice
from smpq.cost import Budget, ResolvedBudget
from smpq.errors import SmpqError
from smpq.shapley import ShapleyResult
from smpq.strategy import SearchProblem, StrategyResult, register
from smpq.transformer.mixed import (
    MixedConfig,
    choice_policy,
    choice_scores,
    interaction_matrix,
    pairwise_lambda,
)
from smpq.transformer.scores import METHODS, spec_key

__all__ = ["Allocated"]

Scores = tuple[np.ndarray, ...]
Scored = tuple[Scores, dict | None, ShapleyResult | None, dict]
Allocator = Callable[[Any, Scores, Budget, ResolvedBudget | None, ShapleyResult | None,
                      MixedConfig],
                     Allocation | tuple[int, ...]]


@dataclass
class Allocated:
    """What a transformer strategy found: the group choice and everything behind it."""

    choice: tuple[int, ...]
    allocation: Allocation | tuple[int, ...]  # the allocator's answer (uniform: the choice)
    scores: Scores
    errors: dict | None  # per-layer errors of the error baselines
    shapley: ShapleyResult | None
    cost: dict  # seconds, forward_passes, backward_passes, ...


def _config(p: SearchProblem) -> MixedConfig:
    return replace(p.options.get("config", MixedConfig()), seed=p.seed)


def _given(p: SearchProblem) -> Scored | None:
    o = p.options
    if o.get("scores") is None:
        return None
    cost = o.get("score_cost") or {"seconds": 0.0, "forward_passes": 0, "backward_passes": 0}
    return o["scores"], None, o.get("shapley_result"), cost


def _allowed(s: Any) -> tuple[tuple[int, ...], ...]:
    """Per group, the allowed candidate indices (all, for a session that does not say)."""
    every = tuple(range(len(s.specs)))
    return tuple(getattr(s, "allowed", None) or (every,) * len(s.groups))


def _pick(rows: Sequence[np.ndarray], allowed: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(r, float)[list(a)] for r, a in zip(rows, allowed, strict=True)]


def _one_ladder(s: Any, name: str) -> None:
    if any(len(a) != len(s.specs) for a in _allowed(s)):
        raise SmpqError(f"{name} plays one ladder of every candidate in every group, but some "
                        "groups cannot store some candidates (GGUF K-quants need rows of whole "
                        "256-blocks); use shapley-loop or a score method")


def _shapley_scores(ladder: bool) -> Callable[[SearchProblem], Scored]:
    def score(p: SearchProblem) -> Scored:
        s = p.model
        _one_ladder(s, "the Shapley game")
        result, _, cost = s.shapley(_config(p), p.options.get("state_path"),
                                    p.options.get("resume", False), ladder)
        return choice_scores(result.estimate, len(s.groups), len(s.specs)), None, result, cost

    return score


def _baseline_scores(method: str) -> Callable[[SearchProblem], Scored]:
    def score(p: SearchProblem) -> Scored:
        scores, errors, cost = p.model.baseline(method)
        return scores, errors, None, cost

    return score


def _milp(s: Any, scores: Scores, budget: Budget, resolved: ResolvedBudget | None,
          result: ShapleyResult | None, config: MixedConfig) -> Allocation:
    costs, limits, scales = s.budget_costs(budget, resolved)
    allowed = _allowed(s)
    alloc = allocate_milp(_pick(scores, allowed),
                          {m: _pick(rows, allowed) for m, rows in costs.items()}, limits,
                          scales=scales)
    return replace(alloc, choice=tuple(a[c] for a, c in zip(allowed, alloc.choice,
                                                             strict=True)))


def _pairwise(s: Any, scores: Scores, budget: Budget, resolved: ResolvedBudget | None,
              result: ShapleyResult | None, config: MixedConfig) -> Allocation:
    _one_ladder(s, "the pairwise allocation")
    costs, limits, scales = s.budget_costs(budget, resolved)
    k = interaction_matrix(result, config.shrinkage)
    return allocate_quadratic(result.estimate, k, costs, limits,
                              pairwise_lambda(k, config.risk), scales=scales)


def _shapley_alloc(s: Any, scores: Scores, budget: Budget, resolved: ResolvedBudget | None,
                   result: ShapleyResult | None, config: MixedConfig) -> Allocation:
    return (_pairwise if config.interactions else _milp)(s, scores, budget, resolved, result,
                                                         config)


def _uniform(s: Any, scores: Scores, budget: Budget, resolved: ResolvedBudget | None,
             result: ShapleyResult | None, config: MixedConfig) -> tuple[int, ...]:
    costs, limits, scales = s.budget_costs(budget, resolved)
    allowed = _allowed(s)
    common = [k for k in range(len(s.specs)) if all(k in a for a in allowed)]
    if not common:
        raise SmpqError("no candidate format can store every group, so there is no uniform "
                        "policy; add a 32-block GGUF type or an int format")
    local = uniform_choice({m: _pick(rows, [common] * len(rows)) for m, rows in costs.items()},
                           limits, scales=scales)
    return tuple(common[c] for c in local)


def _strategy(name: str, score: Callable[[SearchProblem], Scored], allocate: Allocator
              ) -> Callable[[SearchProblem], StrategyResult]:
    def run(p: SearchProblem) -> StrategyResult:
        s, given = p.model, _given(p)
        scores, errors, result, cost = given or score(p)
        if given is None:
            s.progress("allocate", 0, 1)
        alloc = allocate(s, scores, p.budget, p.options.get("resolved"), result,
                         p.options.get("config", MixedConfig()))
        choice = alloc if isinstance(alloc, tuple) else alloc.choice
        policy = choice_policy(s.groups, s.specs, choice, meta={
            "method": name, "backend": s.backend, "budget": str(p.budget),
            "model": s.model_name, "candidates": [spec_key(x) for x in s.specs],
            "seed": p.seed})
        info = {"search_cost": cost,
                "binding": list(alloc.binding) if isinstance(alloc, Allocation) else []}
        return StrategyResult(name, policy, float(cost.get("seconds", 0.0)),
                              int(cost.get("forward_passes", 0)), 0.0, info,
                              detail=Allocated(choice, alloc, scores, errors, result, cost))

    run.__name__ = f"{name}_strategy"
    return run


register("shapley", kind="transformer")(_strategy("shapley", _shapley_scores(True),
                                                  _shapley_alloc))
register("shapley_pairwise", kind="transformer")(
    _strategy("shapley_pairwise", _shapley_scores(True), _pairwise))
register("shapley_literal", kind="transformer")(
    _strategy("shapley_literal", _shapley_scores(False), _milp))
register("uniform", kind="transformer")(
    _strategy("uniform", _baseline_scores("uniform"), _uniform))
for _method in METHODS[1:]:  # hessian, fisher, gradxdw, relerr: scores.LAYER_ERRORS
    register(_method, kind="transformer")(
        _strategy(_method, _baseline_scores(_method), _milp))
del _method
