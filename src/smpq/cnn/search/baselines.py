"""The baselines SMPQ is measured against, each a function returning a `StrategyResult`.

| strategy            | module        | what it spends                                 |
|---------------------|---------------|------------------------------------------------|
| `uniform`           | here          | nothing: the best uniform pair within budget   |
| `hawq`              | hawq          | Hessian-vector products on calibration batches |
| `one_at_a_time`     | sensitivity   | 1 + layers x (|W| + |A| - 2) validation passes |
| `greedy`            | sensitivity   | the same table, or passes along the walk       |
| `random_search`     | oracle        | a given number of validation passes            |
| `oracle`            | oracle        | one validation pass per feasible policy        |
| `interaction_analysis` | interactions | least-squares fits on the oracle's table   |

All of them keep pinned layers (`fixed`) at their choice and take budgets relative to the
pinned reference, as `smpq.cnn.search.search` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.harness import Meter, PolicyEvaluator, SearchSpace
from smpq.cnn.search.hawq import HawqSensitivity, HutchinsonConfig, hawq, hawq_sensitivity
from smpq.cnn.search.interactions import InteractionReport, interaction_analysis
from smpq.cnn.search.oracle import PolicyTable, oracle, random_search
from smpq.cnn.search.sensitivity import Sensitivity, greedy, oat_sensitivity, one_at_a_time
from smpq.cost import Budget, ModelCost, format_metric
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice

__all__ = [
    "HawqSensitivity",
    "HutchinsonConfig",
    "InteractionReport",
    "PolicyEvaluator",
    "PolicyTable",
    "SearchSpace",
    "Sensitivity",
    "greedy",
    "hawq",
    "hawq_sensitivity",
    "interaction_analysis",
    "oat_sensitivity",
    "one_at_a_time",
    "oracle",
    "random_search",
    "uniform",
]

TIE_TOL = 1e-9


def _load(budget: Budget, cost: ModelCost, policy: Policy, fixed) -> tuple[bool, float, list]:
    """(meets every limit, summed value/limit over the constraints, the check rows)."""
    rows = budget.check(cost, policy, fixed)
    return all(r["ok"] for r in rows), sum(r["value"] / r["limit"] for r in rows), rows


def uniform(
    model: nn.Module,
    cost: ModelCost,
    budget: Budget,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    fixed: Mapping[str, LayerChoice | None] | None = None,
) -> StrategyResult:
    """The most expensive uniform W/A pair within the budget (ties: balanced, then more w bits).

    "Expensive" is the summed use of every limit (value / limit), which for one constraint
    is its metric. Pinned layers keep their choice. `model` is unused (common signature).
    """
    del model
    if not w_bits or not a_bits:
        raise SmpqError("uniform needs at least one weight and one activation bit-width")
    meter = Meter()
    fixed = dict(fixed or {})
    rows = []
    for w in w_bits:
        for a in a_bits:
            policy = Policy.uniform(cost.names, w, a, pinned=fixed)
            ok, load, checks = _load(budget, cost, policy, fixed)
            rows.append({"w": w, "a": a, "ok": ok, "load": load, "checks": checks,
                         "policy": policy})
    feasible = [r for r in rows if r["ok"]]
    if not feasible:
        low = min(rows, key=lambda r: (r["load"], -r["w"]))
        over = "; ".join(f"{c['metric']} {format_metric(c['metric'], c['value'])} > limit "
                         f"{format_metric(c['metric'], c['limit'])}"
                         for c in low["checks"] if not c["ok"])
        raise SmpqError(f"budget {budget} admits no uniform pair; the cheapest, "
                        f"W{low['w']}/A{low['a']}, needs {over}")
    top = max(r["load"] for r in feasible)
    # Among equally expensive pairs prefer the balanced one (4/4 over 8/2 at the BitOps of
    # 4/4: far better post-training), then more weight bits.
    best = max((r for r in feasible if r["load"] >= top * (1 - TIE_TOL)),
               key=lambda r: (-abs(r["w"] - r["a"]), r["w"], r["a"]))
    info = {"w_bits": best["w"], "a_bits": best["a"],
            "checks": best["checks"], "feasible_pairs": [f"{r['w']}/{r['a']}" for r in feasible]}
    return meter.result("uniform", best["policy"], info)
