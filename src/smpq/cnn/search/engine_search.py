"""The default CNN strategy, `shapley-loop`: the engine (`smpq.engine`) on deployed policies.

Units are the searched layers; each has two ladders, weight and activation bits (ordered
cheap to rich), so a policy is one (w, a) pair per layer. A policy's value is one switch of a
calibrated, renormalised supernet (which then computes exactly that fake-quantized model) and
one forward pass over the validation split: -KL(float || quantized) by default (the engine
works on -log KL, which orders policies alike), validation loss or accuracy as options. The
engine screens, fits its pairwise surrogate, and evaluates the surrogate's exact top-K
allocations until the evaluation budget is spent.

Options (SearchProblem.options): n_evaluations (default 300), top_k (4), metric ("neg_kl",
"neg_loss" or "acc"), screen_fraction, patience, val_samples, evaluator (a shared
PolicyEvaluator), out (checkpoint folder) and resume, progress (called with (done, planned,
best value)); workers / ray_address / device, or backend (an EvaluatorConfig), choose
where values are computed (`smpq.evaluator`; the same values on every backend).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from smpq.cnn.search.harness import CostTables, Meter, PolicyEvaluator, SearchSpace
from smpq.cnn.search.oracle import _setup
from smpq.cnn.search.tasks import policy_evaluator, track
from smpq.engine.loop import EngineConfig, run_engine
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.strategy import SearchProblem, StrategyResult, register

__all__ = ["DEFAULT_EVALUATIONS", "METRICS", "policy_space", "shapley_loop"]

DEFAULT_EVALUATIONS = 300
METRICS = ("neg_kl", "neg_loss", "acc")
NAME = "shapley-loop"


def policy_space(space: SearchSpace, tables: CostTables) -> PolicySpace:
    """The engine's view of a CNN search space: (weight, activation) ladders per layer.

    The space's candidate lists must be ordered by bits (cheapest first), so that a pair index
    `i * n_act + j` is (weight level i, activation level j).
    """
    for what, specs in (("weight", space.w_specs), ("activation", space.a_specs)):
        bits = [s.bits for s in specs]
        if bits != sorted(bits):
            raise SmpqError(f"{what} candidates must be ordered by bits for {NAME}: {bits}")
    grid = (len(space.w_specs), len(space.a_specs))
    costs = {m: tuple(np.asarray(c[i], float) for i in range(len(space.names)))
             for m, c in tables.costs.items()}
    return PolicySpace(space.names, (grid,) * len(space.names), costs, dict(tables.offsets),
                       dict(tables.limits), ("w", "a"))


def _engine_value(values: np.ndarray, metric: str) -> np.ndarray:
    """What the engine maximises: -log KL for neg_kl (the same order of policies; KL spans
    decades between a good policy and a collapsed one, and its log is closer to additive),
    the value itself otherwise."""
    if metric == "neg_kl":
        return -np.log(np.maximum(-values, 0.0) + 1e-9)
    return values


def _ordered(specs):
    return sorted(specs, key=lambda s: (s.bits, repr(s)))


def checked_metric(p: SearchProblem, name: str) -> str:
    """The value metric of a strategy that scores deployed policies; one-line errors for a
    missing budget or an unknown metric (shared by shapley-loop, evolution and clado)."""
    if p.budget is None:
        raise SmpqError(f"{name} needs a budget")
    metric = p.options.get("metric", "neg_kl")
    if metric not in METRICS:
        raise SmpqError(f"unknown value metric {metric!r} for {name}; known: {', '.join(METRICS)}")
    return metric


def deployed_setup(p: SearchProblem) -> tuple[SearchSpace, Meter, PolicyEvaluator, PolicySpace]:
    """The search space over candidates ordered by bits, a meter, the policy evaluator and the
    engine's view of the space: what every strategy on deployed policies starts from."""
    o = p.options
    space, tables, meter, ev = _setup(p.model, p.cost, p.budget, p.train, p.val,
                                      _ordered(p.w_specs), _ordered(p.a_specs), p.fixed,
                                      o.get("val_samples"), p.seed, o.get("evaluator"))
    return space, meter, ev, policy_space(space, tables)


@register(NAME, kind="cnn")
def shapley_loop(p: SearchProblem) -> StrategyResult:
    o = p.options
    metric = checked_metric(p, NAME)
    cfg = EngineConfig(evaluations=int(o.get("n_evaluations", DEFAULT_EVALUATIONS)),
                       top_k=o.get("top_k", 4), seed=p.seed,
                       screen_fraction=float(o.get("screen_fraction", 0.3)),
                       patience=int(o.get("patience", 20)))
    space, meter, ev, pspace = deployed_setup(p)
    out = o.get("out")
    ckpt = Path(out) / "engine_state.json" if out is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    with policy_evaluator(ev, p.model, p.train, p.val, metric, o, o.get("val_samples"),
                          p.seed) as evaluate:
        track(meter, evaluate)
        res = run_engine(pspace, lambda c: _engine_value(evaluate(c), metric), cfg,
                         checkpoint=ckpt,
                         resume=bool(o.get("resume", False)), progress=o.get("progress"))
    policy = space.policy(res.choice, meta={"method": NAME, "budget": str(p.budget),
                                            "metric": metric, "seed": p.seed})
    info = {"metric": metric, "best_value": res.value, "engine": asdict(cfg),
            "stopped": res.stopped, "r2_cv": res.r2_cv}
    out_res = meter.result(NAME, policy, info)
    out_res.detail = contributions(res, space, pspace, metric)
    return out_res


def contributions(res, space: SearchSpace, pspace: PolicySpace, metric: str) -> dict:
    """The engine's credit in `contributions.json` form (players as the report draws them).

    A player is a ladder step: "layer's weights (or activations) at this bit-width rather than
    the next lower one"; its estimate is the surrogate's ladder Shapley value, its interval
    +-1.96 bootstrap standard errors.
    """
    players = []
    for (u, d, k), phi, se in zip(pspace.players, res.shapley, res.shapley_se, strict=True):
        specs = (space.w_specs, space.a_specs)[d]
        players.append({"layer": space.names[u], "kind": "wa"[d], "bits": specs[k].bits,
                        "estimate": phi, "stderr": se, "ci_low": phi - 1.96 * se,
                        "ci_high": phi + 1.96 * se})
    label = "-log KL to float" if metric == "neg_kl" else metric  # what the engine maximised
    return {"method": NAME, "value": label, "players": players, "best_value": res.value,
            "evaluations": res.evaluations, "stopped": res.stopped, "r2_cv": res.r2_cv,
            "value_curve": res.history, "rounds": res.rounds,
            "interactions": res.interactions, "interaction_matrix": res.interaction_matrix}
