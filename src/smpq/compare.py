"""Put allocation methods side by side at one budget: search, finetune identically, score.

Every method's policy gets the same post-training calibration and the same LSQ QAT
finetune (same epochs, seed, distillation), so only the allocation differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from smpq.cost import Budget, ModelCost
from smpq.data import Splits
from smpq.errors import SmpqError
from smpq.pipeline import calibration_batches, ptq, qat
from smpq.policy import Policy
from smpq.search.common import StrategyResult
from smpq.search.supernet_search import SearchConfig, SearchOutcome, search
from smpq.spec import LayerChoice, parse_bits_pair
from smpq.train import TrainConfig, evaluate

__all__ = ["best_uniform", "outcome_result", "policy_row", "run_method"]


def best_uniform(
    cost: ModelCost,
    budget: Budget,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    fixed: dict[str, LayerChoice | None],
) -> StrategyResult:
    """The most expensive uniform W/A pair that fits the budget (ties: more weight bits)."""
    t0 = time.perf_counter()
    names = cost.names
    best = None
    for w in w_bits:
        for a in a_bits:
            pol = Policy.uniform(names, w, a, pinned=fixed)
            if all(r["ok"] for r in budget.check(cost, pol, fixed)):
                key = (cost.metrics(pol)["bitops"], w)
                if best is None or key > best[0]:
                    best = (key, pol, (w, a))
    if best is None:
        pairs = {n: [LayerChoice.bits(w, a) for w in w_bits for a in a_bits]
                 for n in names if n not in fixed}
        budget.ensure_feasible(cost, {**pairs, **{n: [c] for n, c in fixed.items()}}, fixed)
        raise SmpqError("budget infeasible: no uniform setting fits (a mixed policy may)")
    _, pol, (w, a) = best
    pol = Policy(pol.layers, meta={"method": f"uniform {w}/{a}", "budget": str(budget)})
    return StrategyResult(f"uniform {w}/{a}", pol, time.perf_counter() - t0)


def outcome_result(name: str, out: SearchOutcome) -> StrategyResult:
    return StrategyResult(name, out.policy, out.seconds, out.evaluations, out.forward_seconds,
                          info=out.derivation.summary())


def policy_row(
    model: nn.Module,
    splits: Splits,
    cost: ModelCost,
    result: StrategyResult,
    *,
    finetune_epochs: int,
    seed: int = 0,
    progress: Callable | None = None,
) -> dict:
    """Post-training and finetuned accuracy of one strategy's policy, with its costs."""
    calib = calibration_batches(splits.train, seed=seed)
    pol = result.policy
    q = ptq(model, pol, calib)
    ptq_val, _ = evaluate(q, splits.val)
    ptq_test, _ = evaluate(q, splits.test)
    row = {"method": result.name, "ptq_val_acc": ptq_val, "ptq_test_acc": ptq_test}
    if finetune_epochs:
        cfg = TrainConfig(epochs=finetune_epochs, lr=1e-3, kd_weight=0.5, seed=seed)
        q = qat(model, pol, splits.train, cfg, calib, progress=progress)
    row["val_acc"], _ = evaluate(q, splits.val)
    row["test_acc"], _ = evaluate(q, splits.test)
    m = cost.metrics(pol)
    row.update({"bitops": m["bitops"], "size_bits": m["size"], "avg_bits": m["avg_bits"],
                "search_seconds": result.seconds, "evaluations": result.evaluations,
                "forward_share": result.forward_seconds / result.seconds if result.seconds else 0.0,
                "binding": ",".join(result.info.get("binding", []))})
    return row


def run_method(
    method: str,
    model: nn.Module,
    splits: Splits,
    cost: ModelCost,
    budget: Budget,
    fixed: dict[str, LayerChoice | None],
    cfg: SearchConfig,
    **search_kw,
) -> tuple[StrategyResult, SearchOutcome | None]:
    """'smpq', 'dmpq' or 'uniform' at this budget (with cfg's candidates and seed)."""
    if method == "uniform":
        return best_uniform(cost, budget, cfg.w_bits, cfg.a_bits, fixed), None
    out = search(model, splits.train, splits.val, cost, budget, replace(cfg, method=method),
                 fixed=fixed, **search_kw)
    return outcome_result(method, out), out


def uniform_reference(cost: ModelCost, pair: str, fixed: dict) -> Policy:
    w, a = parse_bits_pair(pair)
    return Policy.uniform(cost.names, w, a, pinned=fixed)
