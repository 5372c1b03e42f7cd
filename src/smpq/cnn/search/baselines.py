"""Every CNN search strategy, registered for `smpq.strategy` (kind "cnn"), and the baselines.

| name      | function (module)             | what it spends                                 |
|-----------|-------------------------------|------------------------------------------------|
| uniform   | `uniform` (here)              | nothing: the best uniform pair within budget   |
| hawq      | `hawq` (hawq)                 | Hessian-vector products on calibration batches |
| oat_high, | `one_at_a_time` (sensitivity) | 1 + layers x (|W| + |A| - 2) validation passes |
| oat_low   |                               |                                                |
| greedy    | `greedy` (sensitivity)        | the same table, or passes along the walk       |
| random    | `random_search` (oracle)      | a given number of validation passes            |
| smpq,dmpq | `search` (supernet_search)    | supernet training + Shapley / alpha epochs     |
| oracle    | `oracle` (oracle)             | one validation pass per feasible policy        |
|           | `interaction_analysis`        | least-squares fits on the oracle's table       |

Each registered function takes a `SearchProblem` (train = training split, val = validation
split) and adapts it to the function in the table. Options they read (all optional):

| option         | used by              | meaning                                                  |
|----------------|----------------------|----------------------------------------------------------|
| sensitivity    | hawq, oat_*, greedy  | {"hawq": HawqSensitivity, "high"/"low": Sensitivity} to  |
|                |                      | reuse across budgets (its cost is still charged)         |
| hutchinson     | hawq                 | HutchinsonConfig (default: its defaults, seed 0)         |
| n_evaluations  | random               | validation passes (default 100)                          |
| metric         | random               | value it maximises: acc (default), neg_loss, neg_kl      |
| max_policies   | oracle               | refuse larger spaces (default MAX_ORACLE_POLICIES)       |
| val_samples,   | oat_*, greedy,       | validation images per pass; a shared PolicyEvaluator     |
| evaluator      | random, oracle       |                                                          |
| config         | smpq, dmpq           | SearchConfig (method, bits, seed: from the problem)      |
| out, resume,   | smpq, dmpq           | checkpoint folder, resume from it, progress callback     |
| progress       |                      |                                                          |

All of them keep pinned layers (`fixed`) at their choice and take budgets relative to the
pinned reference, as `smpq.cnn.search.search` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from smpq.cnn.search.harness import Meter, PolicyEvaluator, SearchSpace
from smpq.cnn.search.hawq import HawqSensitivity, HutchinsonConfig, hawq, hawq_sensitivity
from smpq.cnn.search.interactions import InteractionReport, interaction_analysis
from smpq.cnn.search.oracle import MAX_ORACLE_POLICIES, PolicyTable, oracle, random_search
from smpq.cnn.search.sensitivity import Sensitivity, greedy, oat_sensitivity, one_at_a_time
from smpq.cnn.search.supernet_search import METHODS, SearchConfig, search
from smpq.cnn.search.tasks import evaluator_config
from smpq.cost import Budget, ModelCost, format_metric
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec, act_spec, weight_spec
from smpq.strategy import SearchProblem, StrategyResult, register

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
    "best_uniform",
    "uniform",
]

TIE_TOL = 1e-9


def _load(budget: Budget, cost: ModelCost, policy: Policy, fixed) -> tuple[bool, float, list]:
    """(meets every limit, summed value/limit over the constraints, the check rows)."""
    rows = budget.check(cost, policy, fixed)
    return all(r["ok"] for r in rows), sum(r["value"] / r["limit"] for r in rows), rows


def uniform(
    cost: ModelCost,
    budget: Budget,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    fixed: Mapping[str, LayerChoice | None] | None = None,
) -> StrategyResult:
    """The most expensive uniform W/A pair within the budget (ties: balanced, then more w bits).

    "Expensive" is the summed use of every limit (value / limit), which for one constraint
    is its metric. Pinned layers keep their choice.
    """
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


def best_uniform(cost: ModelCost, budget: Budget, w_bits: Sequence[int], a_bits: Sequence[int],
                 fixed: Mapping[str, LayerChoice | None] | None = None) -> StrategyResult:
    """`uniform`, named 'uniform W/A' (its policy's meta too) for side-by-side tables."""
    res = uniform(cost, budget, w_bits, a_bits, fixed)
    name = f"uniform {res.info['w_bits']}/{res.info['a_bits']}"
    res.name = name
    res.policy = Policy(res.policy.layers, meta={"method": name, "budget": str(budget)})
    return res


# -- the registered strategies: SearchProblem -> the functions above -------------------------

def _bits(specs: Sequence[QuantSpec], make: Callable[[int], QuantSpec], what: str
          ) -> tuple[int, ...]:
    """Bit-widths of standard candidates (uniform and the supernet build specs from bits)."""
    bits = tuple(s.bits for s in specs)
    if tuple(make(b) for b in bits) != tuple(specs):
        raise SmpqError(f"{what} candidates must be the standard formats of their bit-widths "
                        f"(smpq.spec.{make.__name__}), got {list(specs)}")
    return bits


def _args(p: SearchProblem) -> tuple:
    """The baselines' common positional arguments."""
    return (p.model, p.cost, p.budget, p.train, p.val, list(p.w_specs), list(p.a_specs), p.fixed)


def _eval_kw(p: SearchProblem) -> dict:
    return {"seed": p.seed, "val_samples": p.options.get("val_samples"),
            "evaluator": p.options.get("evaluator")}


@register("uniform", kind="cnn")
def uniform_strategy(p: SearchProblem) -> StrategyResult:
    return best_uniform(p.cost, p.budget, _bits(p.w_specs, weight_spec, "uniform"),
                        _bits(p.a_specs, act_spec, "uniform"), p.fixed)


@register("hawq", kind="cnn")
def hawq_strategy(p: SearchProblem) -> StrategyResult:
    return hawq(*_args(p), cfg=p.options.get("hutchinson", HutchinsonConfig()),
                sensitivity=p.options.get("sensitivity", {}).get("hawq"))


def _oat(reference: str) -> Callable[[SearchProblem], StrategyResult]:
    def run(p: SearchProblem) -> StrategyResult:
        return one_at_a_time(*_args(p), reference=reference,
                             sensitivity=p.options.get("sensitivity", {}).get(reference),
                             **_eval_kw(p))

    run.__name__ = f"oat_{reference}_strategy"
    return run


oat_high_strategy = register("oat_high", kind="cnn")(_oat("high"))
oat_low_strategy = register("oat_low", kind="cnn")(_oat("low"))


@register("greedy", kind="cnn")
def greedy_strategy(p: SearchProblem) -> StrategyResult:
    return greedy(*_args(p), sensitivity=p.options.get("sensitivity", {}).get("high"),
                  **_eval_kw(p))


@register("random", kind="cnn")
def random_strategy(p: SearchProblem) -> StrategyResult:
    return random_search(*_args(p), n_evaluations=int(p.options.get("n_evaluations", 100)),
                         metric=p.options.get("metric", "acc"),
                         backend=evaluator_config(p.options), **_eval_kw(p))


def _supernet(method: str) -> Callable[[SearchProblem], StrategyResult]:
    def run(p: SearchProblem) -> StrategyResult:
        o = p.options
        cfg = replace(o.get("config", SearchConfig()), method=method, seed=p.seed,
                      w_bits=_bits(p.w_specs, weight_spec, method),
                      a_bits=_bits(p.a_specs, act_spec, method))
        out = search(p.model, p.train, p.val, p.cost, p.budget, cfg, fixed=dict(p.fixed),
                     out=o.get("out"), resume=o.get("resume", False), progress=o.get("progress"))
        return StrategyResult(method, out.policy, out.seconds, out.evaluations,
                              out.forward_seconds, info=out.derivation.summary(), detail=out)

    run.__name__ = f"{method}_strategy"
    return run


for _method in METHODS:  # smpq, dmpq: the supernet's own list
    register(_method, kind="cnn")(_supernet(_method))
del _method


@register("oracle", kind="cnn", listed=False)  # exhaustive: tiny spaces only
def oracle_strategy(p: SearchProblem) -> StrategyResult:
    return oracle(*_args(p), max_policies=int(p.options.get("max_policies",
                                                            MAX_ORACLE_POLICIES)),
                  backend=evaluator_config(p.options), **_eval_kw(p))
