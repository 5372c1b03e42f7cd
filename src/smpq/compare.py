"""Put allocation methods side by side at one budget: search, finetune identically, score.

Every method's policy gets the same post-training calibration and the same LSQ QAT
finetune (same epochs, seed, distillation), so only the allocation differs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from smpq import strategy
from smpq.cnn.data import Splits
from smpq.cnn.pipeline import calibration_batches, ptq, qat
from smpq.cnn.search.baselines import best_uniform
from smpq.cnn.search.supernet_search import SearchConfig, SearchOutcome
from smpq.cnn.train import TrainConfig, evaluate
from smpq.cost import Budget, ModelCost
from smpq.spec import LayerChoice, act_spec, weight_spec
from smpq.strategy import SearchProblem, StrategyResult

__all__ = [
    "COMPARE_METHODS",
    "best_uniform",
    "compare_methods",
    "finetune_config",
    "outcome_result",
    "policy_row",
    "policy_row_and_model",
    "run_method",
]


def compare_methods() -> tuple[str, ...]:
    """The CNN strategies compared by default: every listed one in the registry."""
    return strategy.names("cnn", listed_only=True)


COMPARE_METHODS = compare_methods()


def outcome_result(name: str, out: SearchOutcome) -> StrategyResult:
    return StrategyResult(name, out.policy, out.seconds, out.evaluations, out.forward_seconds,
                          info=out.derivation.summary(), detail=out)


def finetune_config(epochs: int, seed: int = 0) -> TrainConfig:
    """The one QAT finetune every policy gets (LSQ steps, float teacher at weight 0.5)."""
    return TrainConfig(epochs=epochs, lr=1e-3, kd_weight=0.5, seed=seed)


def policy_row_and_model(
    model: nn.Module,
    splits: Splits,
    cost: ModelCost,
    result: StrategyResult,
    *,
    finetune_epochs: int,
    seed: int = 0,
    progress: Callable | None = None,
) -> tuple[dict, nn.Module]:
    """`policy_row` and the quantized (and finetuned, if asked) model it scored."""
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
    return row, q


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
    return policy_row_and_model(model, splits, cost, result, finetune_epochs=finetune_epochs,
                                seed=seed, progress=progress)[0]


def run_method(
    method: str,
    model: nn.Module,
    splits: Splits,
    cost: ModelCost,
    budget: Budget,
    fixed: dict[str, LayerChoice | None],
    cfg: SearchConfig,
    **options,
) -> tuple[StrategyResult, SearchOutcome | None]:
    """The registered CNN strategy `method` at this budget, with cfg's candidates and seed.

    `options` reach the strategy as `SearchProblem.options` (see smpq.cnn.search.baselines),
    with cfg as "config": 'random' gets `n_evaluations` (default 100) validation passes (pass
    SMPQ's count for a like-for-like comparison); smpq/dmpq take `out`, `resume`, `progress`.
    """
    fn = strategy.get(method, "cnn")
    problem = SearchProblem(
        model, cost, budget, tuple(weight_spec(x) for x in cfg.w_bits),
        tuple(act_spec(x) for x in cfg.a_bits), train=splits.train, val=splits.val,
        fixed=fixed, seed=cfg.seed, options={"config": cfg, **options})
    res = fn(problem)
    return res, res.detail if isinstance(res.detail, SearchOutcome) else None
