"""Accuracy vs BitOps of every allocation method on digits, and regret to an exhaustive oracle.

    python benchmarks/pareto.py            # full: 3 seeds, 5 budgets (1-2 hours on a CPU)
    python benchmarks/pareto.py --quick    # smoke run: 1 seed, 2 budgets, small settings

Part 1 (small_resnet, cached FP model): per budget and seed every method picks a policy
(uniform, HAWQ, one-at-a-time from the high and the low reference + ILP, greedy lowering,
random search with SMPQ's evaluation count, SMPQ, DMPQ); each policy is then finetuned the
same way (QAT with KD from the float model) and tested. Budgets follow BENCHMARKS.md: BitOps
25/50/75% of the way from the cheapest policy to uniform 3/3, plus uniform 3/3 and 4/4.
Part 2 (an MLP with a few searched layers, W{2,3,4} x A{3,4}): every policy is scored
post-training once; per budget the regret of each method to the best feasible policy, on
validation and test (PTQ) and on test after QAT, and how much of the values interactions
between layers explain. Writes benchmarks/results/pareto.{json,md,png} atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from smpq import strategy
from smpq.alloc import count_feasible
from smpq.apply import quantizable_layers
from smpq.cnn.data import get_splits
from smpq.cnn.pipeline import calibration_batches, default_pinned, ptq, qat
from smpq.cnn.search import SearchConfig, SearchOutcome
from smpq.cnn.search.baselines import (
    HutchinsonConfig,
    PolicyTable,
    SearchSpace,
    hawq_sensitivity,
    interaction_analysis,
    oat_sensitivity,
    oracle,
)
from smpq.cnn.search.harness import cost_tables
from smpq.cnn.train import TrainConfig, evaluate, fp_checkpoint, load_checkpoint
from smpq.compare import finetune_config
from smpq.cost import Budget, format_metric, trace_costs
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text
from smpq.policy import Policy
from smpq.spec import act_spec, weight_spec
from smpq.strategy import SearchProblem, StrategyResult

log = logging.getLogger("pareto")
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(".cache/smpq")
METHODS = strategy.names("cnn", listed_only=True)  # uniform, hawq, ..., smpq, dmpq


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    uniform_refs: tuple[str, ...] = ("3/3", "4/4")
    bits: tuple[int, ...] = (2, 3, 4, 8)
    search: dict = field(default_factory=dict)  # SearchConfig overrides for SMPQ/DMPQ
    qat_epochs: int = 3
    hutchinson: HutchinsonConfig = HutchinsonConfig()
    oracle_hidden: tuple[int, ...] = (48, 32, 32, 32, 32, 32, 24)  # 8 linears, 6 searched
    oracle_w: tuple[int, ...] = (2, 3, 4)
    oracle_a: tuple[int, ...] = (3, 4)
    finetune_sample: int = 6  # random feasible policies per budget finetuned in part 2


QUICK = Settings(seeds=(0,), fractions=(0.5,), uniform_refs=("3/3",),
                 search={"epochs": 2, "warmup": 1, "permutations": 2, "val_samples": 120},
                 qat_epochs=1, hutchinson=HutchinsonConfig(max_iters=16, n_samples=256),
                 oracle_hidden=(32, 24, 24, 24, 16), finetune_sample=3)


# -- setup ----------------------------------------------------------------------------------

def load_fp(splits, name: str, kwargs: dict | None = None):
    path = fp_checkpoint("digits", name, TrainConfig(), CACHE, model_kwargs=kwargs)
    model, _ = load_checkpoint(path)
    names = list(quantizable_layers(model))
    cost = trace_costs(model, splits.train[0][0][None])
    return model.eval(), cost, default_pinned(names)


def make_budgets(cost, fixed, w_bits, a_bits, settings: Settings) -> list[tuple[str, Budget]]:
    """BitOps fractions of the way from the cheapest policy to uniform 3/3, then references."""
    def bitops(w, a):
        return cost.metrics(Policy.uniform(cost.names, w, a, pinned=fixed))["bitops"]

    low = min(bitops(w, a) for w in w_bits for a in a_bits)
    high = bitops(3, 3)
    out = [(f"{f:.0%} to 3/3", Budget.parse(f"bitops={low + f * (high - low):.1f}"))
           for f in settings.fractions]
    return out + [(f"uniform {r}", Budget.parse(f"bitops=uniform:{r}"))
                  for r in settings.uniform_refs]


def budget_facts(space, cost, budget) -> dict:
    tables = cost_tables(space, cost, budget)
    limits = {m: lim - tables.offsets[m] for m, lim in tables.limits.items()}
    fc = count_feasible({m: list(tables.costs[m]) for m in limits}, limits)
    total = len(space.names) * math.log10(space.n_pairs)
    return {"limits": tables.limits, "log10_feasible": fc.log10, "exact": fc.exact,
            "degenerate": fc.log10 < 1e-9, "unconstrained": fc.log10 >= total - 1e-9}


def _run(name: str, problem: SearchProblem) -> StrategyResult:
    """The registered strategy; the supernet searches are charged their wall time, with the
    search's own epoch seconds kept as info["search_seconds"]."""
    start = time.perf_counter()
    res = strategy.get(name, "cnn")(problem)
    if isinstance(res.detail, SearchOutcome):
        res.seconds = time.perf_counter() - start
        res.info["search_seconds"] = res.detail.seconds
    return res


def run_methods(model, cost, budget, splits, fixed, seed, settings, w, a, sens) -> dict:
    """Every method's StrategyResult (or an error string) for one budget."""
    problem = SearchProblem(model, cost, budget, [weight_spec(b) for b in w],
                            [act_spec(b) for b in a], train=splits.train, val=splits.val,
                            fixed=fixed, seed=seed,
                            options={"sensitivity": sens,
                                     "config": SearchConfig(**settings.search)})
    out: dict = {}
    for name in METHODS:  # random last: it gets SMPQ's number of validation passes
        if name != "random":
            out[name] = _attempt(name, lambda name=name: _run(name, problem))
    n_eval = out["smpq"].evaluations if isinstance(out["smpq"], StrategyResult) else 100
    problem = replace(problem, options={**problem.options, "n_evaluations": max(n_eval, 1)})
    out["random"] = _attempt("random", lambda: _run("random", problem))
    return out


def _attempt(name, fn):
    try:
        return fn()
    except SmpqError as exc:
        log.warning("%s failed: %s", name, exc)
        return str(exc)


def sensitivities(model, cost, splits, fixed, seed, settings, w, a) -> dict:
    """Per seed, measured once and reused across budgets (each result is charged its cost)."""
    ws, as_ = [weight_spec(b) for b in w], [act_spec(b) for b in a]
    names = SearchSpace.build(cost, ws, as_, fixed).names
    low = (3, 3) if 3 in w and 3 in a else (min(w), min(a))
    return {
        "hawq": hawq_sensitivity(model, splits.train, names, ws, as_,
                                 replace(settings.hutchinson, seed=seed)),
        "high": oat_sensitivity(model, cost, splits.train, splits.val, ws, as_, fixed,
                                reference="high", seed=seed),
        "low": oat_sensitivity(model, cost, splits.train, splits.val, ws, as_, fixed,
                               reference="low", low=low, seed=seed),
    }


def assess(model, policy, splits, seed, epochs, calib, cache: dict) -> dict:
    """PTQ validation/test accuracy and test accuracy after QAT (memoised per policy)."""
    key = json.dumps(policy.bits_table(), sort_keys=True)
    if key not in cache:
        q = ptq(model, policy, calib)
        cfg = finetune_config(epochs, seed)
        f = qat(model, policy, splits.train, cfg, calib)
        cache[key] = {f"{kind}_{part}": evaluate(mod, getattr(splits, part))[0]
                      for kind, mod in (("ptq", q), ("qat", f)) for part in ("val", "test")}
    return cache[key]


def record(res, method, seed, label, cost, budget, fixed) -> dict:
    if not isinstance(res, StrategyResult):
        return {"method": method, "seed": seed, "budget": label, "error": res}
    m = cost.metrics(res.policy)
    lim = budget.limits(cost, fixed)["bitops"]
    return {"method": method, "seed": seed, "budget": label, "bitops": m["bitops"],
            "used": m["bitops"] / lim, "feasible": all(r["ok"] for r in
                                                       budget.check(cost, res.policy, fixed)),
            "bits": {n: f"{w}/{a}" for n, (w, a) in res.policy.bits_table().items()},
            "seconds": res.seconds, "evaluations": res.evaluations,
            "forward_seconds": res.forward_seconds, "binding": res.info.get("binding", [])}


# -- part 1 ---------------------------------------------------------------------------------

def main_study(splits, settings: Settings) -> dict:
    model, cost, fixed = load_fp(splits, "small_resnet")
    w = a = settings.bits
    space = SearchSpace.build(cost, [weight_spec(b) for b in w], [act_spec(b) for b in a], fixed)
    budgets = make_budgets(cost, fixed, w, a, settings)
    facts = {label: budget_facts(space, cost, b) for label, b in budgets}
    rows = []
    for seed in settings.seeds:
        calib, cache = calibration_batches(splits.train, seed=seed), {}
        sens = sensitivities(model, cost, splits, fixed, seed, settings, w, a)
        for label, budget in budgets:
            log.info("part 1: seed %d, budget %s", seed, label)
            for method, res in run_methods(model, cost, budget, splits, fixed, seed,
                                           settings, w, a, sens).items():
                row = record(res, method, seed, label, cost, budget, fixed)
                if "error" not in row:
                    row.update(assess(model, res.policy, splits, seed, settings.qat_epochs,
                                      calib, cache))
                rows.append(row)
    fp_acc = {s: evaluate(model, getattr(splits, s))[0] for s in ("val", "test")}
    for label, f in facts.items():
        f["binding"] = sorted({m for r in rows if r["budget"] == label and "binding" in r
                               for m in r["binding"]})
    return {"model": "small_resnet", "fp": fp_acc, "budgets": facts, "runs": rows}


# -- part 2 ---------------------------------------------------------------------------------

def oracle_study(splits, settings: Settings) -> dict:
    model, cost, fixed = load_fp(splits, "mlp", {"hidden": list(settings.oracle_hidden)})
    w, a = settings.oracle_w, settings.oracle_a
    ws, as_ = [weight_spec(b) for b in w], [act_spec(b) for b in a]
    space = SearchSpace.build(cost, ws, as_, fixed)
    full = oracle(model, cost, None, splits.train, splits.val, ws, as_, fixed, seed=0)
    table = PolicyTable.from_dict(full.info["table"])
    calib0 = calibration_batches(splits.train, seed=0)  # every PTQ number here uses it
    out = {"model": f"mlp hidden={list(settings.oracle_hidden)}", "layers": list(space.names),
           "policies": len(table.values), "oracle_seconds": full.seconds,
           "interactions": interaction_analysis(table).to_dict(), "budgets": {}, "runs": []}
    budgets = make_budgets(cost, fixed, w, a, settings)
    masks, best = {}, {}
    for label, budget in budgets:
        facts = budget_facts(space, cost, budget)
        masks[label] = mask = table.feasible(facts["limits"])
        best[label] = space.policy(table.choices[table.best(mask)])
        facts.update({"n_feasible": int(mask.sum()), "median_val": float(np.median(
            table.values[mask])), "oracle_val": float(table.values[table.best(mask)])})
        if mask.sum() >= 20:
            facts["interactions"] = interaction_analysis(table, mask=mask).to_dict()
        facts["finetune_sample"] = _finetune_sample(model, table, mask, space, splits,
                                                    settings, calib0)
        out["budgets"][label] = facts
    for seed in settings.seeds:
        sens = sensitivities(model, cost, splits, fixed, seed, settings, w, a)
        cache: dict = {}
        for label, budget in budgets:
            log.info("part 2: seed %d, budget %s", seed, label)
            facts, mask = out["budgets"][label], masks[label]
            ref = assess(model, best[label], splits, seed, settings.qat_epochs, calib0, cache)
            facts.setdefault("oracle_ptq_test", ref["ptq_test"])
            facts.setdefault("oracle_qat_test", []).append(ref["qat_test"])
            for method, res in run_methods(model, cost, budget, splits, fixed, seed, settings,
                                           w, a, sens).items():
                row = record(res, method, seed, label, cost, budget, fixed)
                if "error" not in row:
                    val = float(table.values[table.lookup(space.choice_of(res.policy))])
                    got = assess(model, res.policy, splits, seed, settings.qat_epochs, calib0,
                                 cache)
                    row.update(got, val=val, regret_val=facts["oracle_val"] - val,
                               regret_ptq_test=ref["ptq_test"] - got["ptq_test"],
                               regret_qat_test=ref["qat_test"] - got["qat_test"],
                               beaten_by=float(np.mean(table.values[mask] > val)))
                out["runs"].append(row)
    return out


def _finetune_sample(model, table, mask, space, splits, settings, calib) -> dict | None:
    """Does the PTQ ranking survive QAT? Spearman over random feasible policies + the best."""
    rows = np.flatnonzero(mask)
    if settings.finetune_sample < 2 or len(rows) < 3:
        return None
    pick = np.random.default_rng(0).choice(rows, min(settings.finetune_sample, len(rows)),
                                           replace=False)
    pick = np.unique(np.append(pick, table.best(mask)))
    got = [assess(model, space.policy(table.choices[r]), splits, 0, settings.qat_epochs,
                  calib, {}) for r in pick]
    rho = stats.spearmanr(table.values[pick], [g["qat_test"] for g in got]).statistic
    return {"n": len(pick), "spearman_ptq_val_vs_qat_test": float(rho),
            "best_ptq_is_best_qat": bool(np.argmax([g["qat_test"] for g in got])
                                         == int(np.flatnonzero(pick == table.best(mask))[0]))}


# -- reporting ------------------------------------------------------------------------------

def _ms(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{100 * np.mean(v):.1f}" + (f" ± {100 * np.std(v):.1f}" if len(v) > 1 else "")


def _grid(runs, budgets, key, fmt=_ms) -> list[str]:
    lines = ["| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for m in METHODS:
        cells = [fmt([r.get(key) for r in runs if r["method"] == m and r["budget"] == b
                      and "error" not in r]) for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _cost_lines(runs) -> list[str]:
    ok = [r for r in runs if "error" not in r]
    ref = np.mean([r["seconds"] for r in ok if r["method"] == "smpq"] or [math.nan])
    lines = ["| method | wall s (mean) | x SMPQ | evaluations | forward share |",
             "|---|---|---|---|---|"]
    for m in METHODS:
        rs = [r for r in ok if r["method"] == m]
        if rs:
            s = np.mean([r["seconds"] for r in rs])
            share = np.sum([r["forward_seconds"] for r in rs]) / max(
                np.sum([r["seconds"] for r in rs]), 1e-12)
            lines.append(f"| {m} | {s:.2f} | {s / ref:.3f} | "
                         f"{np.mean([r['evaluations'] for r in rs]):.0f} | {share:.0%} |")
    return lines


def markdown(res: dict) -> str:
    p1, p2 = res["main"], res["oracle"]
    budgets = list(p1["budgets"])
    lines = ["# Accuracy vs BitOps by allocation method (digits)", "",
             f"Settings: {res['settings_note']}. Accuracies in %, mean ± std over seeds "
             f"{res['settings']['seeds']}. FP small_resnet: val {100 * p1['fp']['val']:.1f}, "
             f"test {100 * p1['fp']['test']:.1f}.", "", "## Budgets (small_resnet)", "",
             "| budget | BitOps limit | log10 #feasible | binding | note |",
             "|---|---|---|---|---|"]
    for b, f in p1["budgets"].items():
        note = "degenerate" if f["degenerate"] else "unconstrained" if f["unconstrained"] else ""
        lines.append(f"| {b} | {format_metric('bitops', f['limits']['bitops'])} | "
                     f"{f['log10_feasible']:.2f}{'' if f['exact'] else ' (est.)'} | "
                     f"{', '.join(f['binding']) or '-'} | {note} |")
    for title, key in (("Test accuracy after QAT", "qat_test"),
                       ("Test accuracy post-training (PTQ)", "ptq_test"),
                       ("Validation accuracy post-training", "ptq_val")):
        lines += ["", f"## {title}", ""] + _grid(p1["runs"], budgets, key)
    lines += ["", "## BitOps used / limit", ""] + _grid(
        p1["runs"], budgets, "used", lambda v: f"{np.mean(v):.3f}" if v else "-")
    lines += ["", "## Search cost (small_resnet, per budget; measurements reused across budgets "
              "are charged in full each time)", ""] + _cost_lines(p1["runs"])
    it = p2["interactions"]
    lines += ["", f"## Exhaustive oracle: {p2['model']}, {p2['policies']} policies, "
              f"W{{{','.join(map(str, res['settings']['oracle_w']))}}} x "
              f"A{{{','.join(map(str, res['settings']['oracle_a']))}}}", "",
              f"Scoring every policy took {p2['oracle_seconds']:.1f} s. Variance of validation "
              f"accuracy explained (R^2, in sample / held out): additive "
              f"{it['additive']['r2_all']:.3f} / {it['additive']['r2_test']:.3f}, pairwise "
              f"{it['pairwise']['r2_all']:.3f} / {it['pairwise']['r2_test']:.3f}.", "",
              "| budget | #feasible | oracle val | median val | oracle PTQ test | "
              "oracle QAT test | PTQ->QAT spearman |", "|---|---|---|---|---|---|---|"]
    for b, f in p2["budgets"].items():
        fs = f.get("finetune_sample") or {}
        rho = fs.get("spearman_ptq_val_vs_qat_test")
        lines.append(f"| {b} | {f['n_feasible']} | {100 * f['oracle_val']:.1f} | "
                     f"{100 * f['median_val']:.1f} | {100 * f['oracle_ptq_test']:.1f} | "
                     f"{_ms(f['oracle_qat_test'])} | "
                     f"{'-' if rho is None else f'{rho:.2f}'} |")
    b2 = list(p2["budgets"])
    for title, key in (("Regret on validation (PTQ), points", "regret_val"),
                       ("Regret on test (PTQ), points", "regret_ptq_test"),
                       ("Regret on test after QAT, points", "regret_qat_test"),
                       ("Share of feasible policies better on validation", "beaten_by")):
        lines += ["", f"### {title}", ""] + _grid(p2["runs"], b2, key)
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p1 = res["main"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHODS:
        pts = []
        for b in p1["budgets"]:
            rs = [r for r in p1["runs"] if r["method"] == m and r["budget"] == b
                  and "error" not in r]
            if rs:
                pts.append((np.mean([r["bitops"] for r in rs]) / 1e6,
                            100 * np.mean([r["qat_test"] for r in rs]),
                            100 * np.std([r["qat_test"] for r in rs])))
        if pts:
            x, y, e = map(np.array, zip(*sorted(pts), strict=True))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m)
    ax.axhline(100 * p1["fp"]["test"], color="grey", ls="--", lw=1, label="float")
    ax.set(xlabel="BitOps (M)", ylabel="test accuracy after QAT (%)",
           title="small_resnet on digits")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _clean(o):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 budgets, small settings")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: small models gain nothing from more, and a "
                        "busy machine makes extra threads spin: 100x slower forwards seen)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    splits = get_splits("digits")
    start = time.perf_counter()
    res = {"settings": {**asdict(settings), "hutchinson": asdict(settings.hutchinson)},
           "settings_note": "quick smoke run" if args.quick else "full run",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "main": main_study(splits, settings), "oracle": oracle_study(splits, settings)}
    res["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(res), indent=1, allow_nan=False)
    atomic_write_text(args.out / "pareto.json", text + "\n")
    atomic_write_text(args.out / "pareto.md", markdown(res))
    plot(res, args.out / "pareto.png")
    log.info("done in %.0f s; wrote %s", res["seconds"], args.out / "pareto.md")


if __name__ == "__main__":
    main()
