"""Put allocation methods side by side at one budget: search, finetune identically, score.

Every method's policy gets the same post-training calibration and the same LSQ QAT
finetune (same epochs, seed, distillation), so only the allocation differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import nn

from smpq.cnn.data import Splits
from smpq.cnn.pipeline import calibration_batches, ptq, qat
from smpq.cnn.search.baselines import uniform
from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.supernet_search import METHODS, SearchConfig, SearchOutcome, search
from smpq.cnn.train import TrainConfig, evaluate
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, act_spec, weight_spec

__all__ = [
    "COMPARE_METHODS",
    "best_uniform",
    "finetune_config",
    "outcome_result",
    "policy_row",
    "run_method",
]

COMPARE_METHODS = ("uniform", "hawq", "oat_high", "oat_low", "greedy", "random", "smpq", "dmpq")


def best_uniform(
    cost: ModelCost,
    budget: Budget,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    fixed: dict[str, LayerChoice | None],
) -> StrategyResult:
    """The most expensive uniform W/A pair that fits the budget, named 'uniform W/A'."""
    res = uniform(None, cost, budget, w_bits, a_bits, fixed)
    name = f"uniform {res.info['w_bits']}/{res.info['a_bits']}"
    res.name = name
    res.policy = Policy(res.policy.layers, meta={"method": name, "budget": str(budget)})
    return res


def outcome_result(name: str, out: SearchOutcome) -> StrategyResult:
    return StrategyResult(name, out.policy, out.seconds, out.evaluations, out.forward_seconds,
                          info=out.derivation.summary())


def finetune_config(epochs: int, seed: int = 0) -> TrainConfig:
    """The one QAT finetune every policy gets (LSQ steps, float teacher at weight 0.5)."""
    return TrainConfig(epochs=epochs, lr=1e-3, kd_weight=0.5, seed=seed)


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
        q = qat(model, pol, splits.train, finetune_config(finetune_epochs, seed), calib,
                progress=progress)
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
    """One of COMPARE_METHODS at this budget, with cfg's candidates and seed.

    'random' gets `n_evaluations` (default 100) validation passes; pass SMPQ's count for a
    like-for-like comparison.
    """
    if method == "uniform":
        return best_uniform(cost, budget, cfg.w_bits, cfg.a_bits, fixed), None
    if method not in COMPARE_METHODS:
        raise SmpqError(f"unknown method {method!r}; known: {', '.join(COMPARE_METHODS)}")
    if method not in METHODS:
        from smpq.cnn.search import baselines as b

        w_specs = [weight_spec(x) for x in cfg.w_bits]
        a_specs = [act_spec(x) for x in cfg.a_bits]
        args = (model, cost, budget, splits.train, splits.val, w_specs, a_specs, fixed)
        kw = {"seed": cfg.seed}
        if method == "hawq":
            return b.hawq(*args), None
        if method.startswith("oat_"):
            return b.one_at_a_time(*args, reference=method[4:], **kw), None
        if method == "greedy":
            return b.greedy(*args, **kw), None
        n = int(search_kw.get("n_evaluations", 100))
        return b.random_search(*args, n_evaluations=n, **kw), None
    search_kw.pop("n_evaluations", None)
    out = search(model, splits.train, splits.val, cost, budget, replace(cfg, method=method),
                 fixed=fixed, **search_kw)
    return outcome_result(method, out), out
