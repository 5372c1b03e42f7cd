"""The jobs behind the `smpq` commands, as functions: they compute and write files, the CLI
parses arguments, calls them and prints what they return.

| function          | command        | writes in `out`                                          |
|-------------------|----------------|----------------------------------------------------------|
| evaluate_policy   | quantize       | (the caller saves policy, metrics, weights)              |
| run_search        | search         | policy.json, contributions.json, cost.json, summary.json,|
|                   |                | search_log.jsonl, report.html + PNGs                     |
| derive_from_run   | derive         | policy.json (a finished search at another budget)        |
| run_compare       | compare        | policies/*.json, compare.json, compare.md, compare.png   |
| run_default       | run            | shapley-loop/, smpq/ and dmpq/ as search,                |
|                   |                | dmpq_alpha_vs_smpq_shapley.*, results.json, results.md   |

Methods are looked up in `smpq.strategy`'s registry (through `compare.run_method`). Progress
is reported through a `ProgressFactory`: `progress(description, total)` is a context manager
yielding a callback `(done, total, metrics=None)`; the default shows nothing.

Final outputs go to `out`; resumable state (search checkpoints) to `work`, which defaults to
`out`. The CLI claims the folder with `smpq.fileio.output_dir`: `out` is then a staging
folder swapped in at the end, `work` the locked folder itself, so a killed run can resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from smpq.cnn.data import Splits
from smpq.cnn.search.engine_search import DEFAULT_EVALUATIONS
from smpq.cnn.search.engine_search import NAME as ENGINE
from smpq.cnn.search.supernet_search import METHODS as SUPERNET_METHODS
from smpq.cnn.search.supernet_search import SearchConfig, SearchOutcome
from smpq.compare import best_uniform, policy_row, policy_row_and_model, run_method
from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text
from smpq.policy import Policy
from smpq.spec import LayerChoice
from smpq.strategy import StrategyResult

__all__ = [
    "ROW_COLS",
    "DefaultRun",
    "ProgressFactory",
    "alpha_vs_shapley",
    "check_budget",
    "check_budget_untrained",
    "derive_from_run",
    "evaluate_policy",
    "fmt_cell",
    "markdown",
    "no_progress",
    "run_compare",
    "run_default",
    "run_search",
    "write_engine_outputs",
    "write_search_outputs",
]

ROW_COLS = ["method", "ptq_val_acc", "val_acc", "test_acc", "bitops", "avg_bits",
            "search_seconds", "evaluations", "binding"]
ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[..., None]]]
Fixed = dict[str, LayerChoice | None]


def no_progress(description: str, total: int) -> AbstractContextManager[Callable[..., None]]:
    """A ProgressFactory that reports nothing."""
    return nullcontext(lambda *args, **kwargs: None)


def fmt_cell(v: Any) -> str:
    """One table cell: yes/NO for booleans, 4 significant digits, scientific past 1e5."""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _epochs(bar: Callable[..., None]) -> Callable[[str, int, int], None]:
    """A search progress callback that forwards epoch ticks to a progress bar."""
    return lambda kind, done, total: bar(done, total) if kind == "epoch" else None


def check_budget(mc: ModelCost, budget: Budget, cfg: SearchConfig, fixed: Fixed) -> None:
    """Raise SmpqError if no policy over cfg's candidate bits meets `budget` (as the search
    itself checks it); needs only the layer shapes, so commands call it before training."""
    from smpq.spec import act_spec, weight_spec

    pairs = [LayerChoice(weight_spec(w), act_spec(a)) for w in cfg.w_bits for a in cfg.a_bits]
    budget.ensure_feasible(mc, {**{n: pairs for n in mc.names if n not in fixed},
                                **{n: [c] for n, c in fixed.items()}}, fixed)


def check_budget_untrained(data: str, model: str, checkpoint: Path | None,
                           data_dir: str | None, budget: Budget, cfg: SearchConfig, pin: bool,
                           seed: int = 0) -> None:
    """`check_budget` before a float model is trained: feasibility needs only the layer
    shapes, which an untrained model of the same architecture has. A no-op with a
    `checkpoint` (loading it is cheap, and every search checks before it trains)."""
    if checkpoint is not None:
        return
    from smpq.cnn.data import get_splits
    from smpq.cnn.models import build_model
    from smpq.cnn.pipeline import default_pinned
    from smpq.cost import trace_costs

    splits = get_splits(data, data_dir)
    net = build_model(model, splits.input_shape, splits.num_classes, seed=seed)
    mc = trace_costs(net, splits.val[0][0][None])
    check_budget(mc, budget, cfg, default_pinned(mc.names) if pin else {})


# -- quantize -------------------------------------------------------------------------------

def evaluate_policy(net: nn.Module, splits: Splits, mc: ModelCost, pol: Policy, *,
                    qat_epochs: int = 0, seed: int = 0, label: str | None = None,
                    progress: ProgressFactory = no_progress) -> tuple[dict, nn.Module]:
    """PTQ (and optional QAT) of one policy; returns a result row and the quantized model.

    The accuracies come from `compare.policy_row`, so `smpq quantize` scores a policy exactly
    as `smpq compare` does."""
    name = label or pol.meta.get("name", "policy")
    bar = progress(f"QAT {label or ''}", qat_epochs) if qat_epochs else nullcontext(None)
    with bar as cb:
        row, qnet = policy_row_and_model(net, splits, mc, StrategyResult(name, pol, 0.0),
                                         finetune_epochs=qat_epochs, seed=seed, progress=cb)
    m = mc.metrics(pol)
    return {"policy": name, "val_acc": row["val_acc"], "test_acc": row["test_acc"],
            "size_kib": m["size"] / 8 / 1024, "mbitops": m["bitops"] / 1e6,
            "avg_bits": m["avg_bits"]}, qnet


# -- search ---------------------------------------------------------------------------------

def _write_outputs(out: Path, policy: Policy, contributions: dict, log: Sequence[dict],
                   binding: set[str], rows: list[dict], budget: Budget, mc: ModelCost,
                   fixed: Fixed) -> None:
    """policy.json, contributions.json, cost.json (what `derive_from_run` reads),
    search_log.jsonl, summary.json, report.html + PNGs."""
    from smpq.cnn.search.derive import COST_FILE
    from smpq.report import write_report

    policy.save(out / "policy.json")
    atomic_write_text(out / "contributions.json", json.dumps(contributions, indent=1))
    atomic_write_text(out / COST_FILE, json.dumps(mc.to_dict(), indent=1))
    atomic_write_text(out / "search_log.jsonl", "".join(json.dumps(h) + "\n" for h in log))
    brows = [{**r, "binding": r["metric"] in binding} for r in budget.check(mc, policy, fixed)]
    atomic_write_text(out / "summary.json", json.dumps(
        {"rows": rows, "budget": brows, "policy_meta": dict(policy.meta)}, indent=2))
    comparison = [{"method": r["method"], "val_acc": r["val_acc"], "test_acc": r["test_acc"],
                   "bitops": r["bitops"], "size_bits": r["size_bits"],
                   "avg_bits": r["avg_bits"]} for r in rows]
    write_report(out, title=f"{policy.meta.get('method', 'search')} at {budget}",
                 policy=policy, contributions=contributions, comparison=comparison, budget=brows)


def write_search_outputs(out: Path, outcome: SearchOutcome, rows: list[dict], budget: Budget,
                         mc: ModelCost, fixed: Fixed) -> None:
    """The files of a supernet search (smpq, dmpq)."""
    _write_outputs(out, outcome.policy, outcome.contributions, outcome.history,
                   set(outcome.derivation.summary()["binding"]), rows, budget, mc, fixed)


def write_engine_outputs(out: Path, found: StrategyResult, rows: list[dict], budget: Budget,
                         mc: ModelCost, fixed: Fixed) -> None:
    """The files of an engine search (shapley-loop): the log holds one line per loop round,
    predicted vs measured value."""
    contributions = found.detail
    _write_outputs(out, found.policy, contributions, contributions["rounds"], set(), rows,
                   budget, mc, fixed)


def run_search(net: nn.Module, splits: Splits, mc: ModelCost, budget: Budget,
               cfg: SearchConfig, fixed: Fixed, *, out: Path, resume: bool = False,
               compare: bool = True, finetune_epochs: int = 3, seed: int = 0,
               progress: ProgressFactory = no_progress, method: str | None = None,
               options: Mapping[str, Any] | None = None, work: Path | None = None
               ) -> list[dict]:
    """`method`'s search (default cfg.method; and the best uniform policy), finetuned and
    scored; writes `out` (and its checkpoint into `work`, default `out`). Supernet methods run
    cfg's epochs; the engine (shapley-loop) spends `options["n_evaluations"]` value
    evaluations; cfg gives both the candidates and the seed."""
    method = method or cfg.method
    options = dict(options or {})
    supernet = method in SUPERNET_METHODS
    total = cfg.epochs if supernet else int(options.get("n_evaluations", DEFAULT_EVALUATIONS))
    with progress(f"{method} search", total) as bar:
        tick = _epochs(bar) if supernet else (lambda done, planned, best: bar(done, planned))
        found, outcome = run_method(method, net, splits, mc, budget, fixed, cfg,
                                    out=out if work is None else work, resume=resume,
                                    progress=tick, **options)
    results = [found]
    if compare:
        results.append(best_uniform(mc, budget, cfg.w_bits, cfg.a_bits, fixed))
    rows = [policy_row(net, splits, mc, r, finetune_epochs=finetune_epochs, seed=seed)
            for r in results]
    if outcome is not None:
        write_search_outputs(out, outcome, rows, budget, mc, fixed)
    elif isinstance(found.detail, dict) and "value_curve" in found.detail:
        write_engine_outputs(out, found, rows, budget, mc, fixed)
    else:
        found.policy.save(out / "policy.json")
    return rows


def derive_from_run(run_dir: Path, budget: Budget, out: Path, stage: Path | None = None
                    ) -> tuple[Policy, list[dict]]:
    """A finished search's policy at another budget (no search); writes policy.json into
    `stage` (the claimed output folder's staging folder) or else `out`.

    Returns the policy and its per-constraint budget check."""
    from smpq.cnn.search.derive import load_search

    if out.resolve() == Path(run_dir).resolve():
        raise SmpqError("--out must not be the run folder: it would replace the search's own "
                        "policy.json")
    run = load_search(run_dir)
    policy = run.derive(budget).policy
    rows = run.check(budget, policy)
    policy.save((stage or out) / "policy.json")
    return policy, rows


# -- compare --------------------------------------------------------------------------------

def run_compare(methods: Sequence[str], net: nn.Module, splits: Splits, mc: ModelCost,
                budget: Budget, fixed: Fixed, cfg: SearchConfig, *, out: Path,
                finetune_epochs: int = 3, seed: int = 0,
                progress: ProgressFactory = no_progress,
                options: Mapping[str, Any] | None = None) -> list[dict]:
    """Every method at one budget, finetuned alike; writes policies/, compare.json/.md/.png.
    `options` reach every method (e.g. `backend`, where value evaluations run)."""
    from smpq.report import plot_tradeoff

    rows, evals = [], 100
    # The engine (else SMPQ) first, so that random search gets as many validation passes, and
    # with the engine the same value (-KL to the float model)
    lead = ENGINE if ENGINE in methods else "smpq"
    extra = {"metric": "neg_kl"} if lead == ENGINE else {}
    for method in sorted(methods, key=lambda m: m != lead):
        with progress(method, 1) as bar:
            opts = {**extra, "n_evaluations": evals} if method == "random" else {}
            opts = {**(options or {}), **opts}
            res, _ = run_method(method, net, splits, mc, budget, fixed, cfg, **opts)
            bar(1, 1)
        if method == lead:
            evals = max(res.evaluations, 1)
        rows.append(policy_row(net, splits, mc, res, finetune_epochs=finetune_epochs, seed=seed))
        res.policy.save(out / "policies" / f"{method}.json")
    atomic_write_text(out / "compare.json", json.dumps({"budget": str(budget), "rows": rows},
                                                       indent=2))
    atomic_write_text(out / "compare.md", markdown(rows, ROW_COLS))
    plot_tradeoff([{**r, "method": r["method"]} for r in rows], out / "compare.png")
    return rows


# -- the default run ------------------------------------------------------------------------

@dataclass
class DefaultRun:
    """What `run_default` found: the table rows and how often alpha and Shapley agree."""

    rows: list[dict]
    agree: int
    decisions: int


def alpha_vs_shapley(out: Path, dmpq: SearchOutcome, smpq: SearchOutcome) -> tuple[int, int]:
    """The paper's point: where DMPQ's alpha and SMPQ's Shapley values choose differently.

    Writes the plot and the per-decision JSON; returns (agreeing decisions, decisions)."""
    from smpq.report import alpha_shapley_agreement, plot_alpha_vs_shapley

    merged = {"players": smpq.contributions["players"],
              "layers": dmpq.contributions["layers"]}
    plot_alpha_vs_shapley(merged, out / "dmpq_alpha_vs_smpq_shapley.png")
    rows = alpha_shapley_agreement(merged)
    atomic_write_text(out / "dmpq_alpha_vs_smpq_shapley.json", json.dumps(rows, indent=1))
    agree = sum(r["alpha_choice_bits"] == r["shapley_choice_bits"] for r in rows)
    return agree, len(rows)


def run_default(net: nn.Module, splits: Splits, meta: dict, mc: ModelCost, budget: Budget,
                cfg: SearchConfig, fixed: Fixed, *, out: Path, data: str, model: str,
                finetune_epochs: int = 3, seed: int = 0,
                progress: ProgressFactory = no_progress, work: Path | None = None) -> DefaultRun:
    """Float model, SMPQ and DMPQ at one budget vs uniform; writes `out` (see module doc)
    and the searches' checkpoints to `work`/smpq and `work`/dmpq."""
    from smpq.cnn.train import evaluate

    fp_val, _ = evaluate(net, splits.val)
    fp_test, _ = evaluate(net, splits.test)
    fp_m = mc.metrics(Policy(dict.fromkeys(mc.names)))
    rows = [{"method": "float32", "ptq_val_acc": fp_val, "val_acc": fp_val, "test_acc": fp_test,
             "bitops": fp_m["bitops"], "avg_bits": fp_m["avg_bits"], "size_bits": fp_m["size"]}]
    outcomes = {}
    engine_evals = DEFAULT_EVALUATIONS
    for method in (ENGINE, "smpq", "dmpq", "uniform", "random"):
        if method == "uniform":
            res, outcome = run_method(method, net, splits, mc, budget, fixed, cfg)
        elif method == "random":  # the engine's evaluation budget and value
            with progress("random search", 1) as bar:
                res, outcome = run_method(method, net, splits, mc, budget, fixed, cfg,
                                          n_evaluations=engine_evals, metric="neg_kl")
                bar(1, 1)
        elif method == ENGINE:
            with progress(f"{method} search", engine_evals) as bar:
                res, outcome = run_method(
                    method, net, splits, mc, budget, fixed, cfg,
                    out=(out if work is None else work) / method, n_evaluations=engine_evals,
                    progress=lambda d, t, b, bar=bar: bar(d, t))
            engine_evals, engine_res = res.evaluations, res
        else:
            with progress(f"{method} search", cfg.epochs) as bar:
                res, outcome = run_method(method, net, splits, mc, budget, fixed, cfg,
                                          out=(out if work is None else work) / method,
                                          progress=_epochs(bar))
        outcomes[method] = outcome
        rows.append(policy_row(net, splits, mc, res, finetune_epochs=finetune_epochs,
                               seed=seed))
    write_engine_outputs(out / ENGINE, engine_res, rows, budget, mc, fixed)
    for method in ("smpq", "dmpq"):
        write_search_outputs(out / method, outcomes[method], rows, budget, mc, fixed)
    agree, decisions = alpha_vs_shapley(out, outcomes["dmpq"], outcomes["smpq"])
    result = {"data": data, "model": model, "budget": str(budget),
              "fp_checkpoint": meta.get("cache_key"), "search": cfg.to_dict(),
              "finetune_epochs": finetune_epochs, "seed": seed, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown(rows, ROW_COLS))
    return DefaultRun(rows, agree, decisions)
