"""Mixed-precision weight-only PTQ of transformers: Shapley allocation vs per-layer baselines.

    python benchmarks/llm_ptq.py            # full (budget ~40 min on 2 busy cores)
    python benchmarks/llm_ptq.py --quick    # smoke run (< 3 min once the tiny LM is cached)

Models: the project's tiny Llama LM (stdlib text, `default_tiny_lm`, cached) -- test
perplexity (per byte) on stdlib "test" blocks and KL to float; all-MiniLM-L6-v2 -- embedding
cosine to float on test docstring texts and retrieval agreement (Spearman of the document
scores, top-10 overlap, recall@1). Budgets: average weight bits {2.5, 3, 3.5, 4, 4.5} over
the candidates int2/int3/int4/int8 (asymmetric, groups of 32); every method gets the same
candidate weights and backend and the same exact MILP, only the scores differ. Shapley uses
seeds (permutation sampling); the baselines are deterministic given the calibration data.
Noise: per budget, the best method is compared with the runner-up by the paired difference
over test items (blocks / texts); "win" needs |diff| > 2 paired stderr, else "tie".
There is no exhaustive oracle here (4^16 policies and more). Writes
benchmarks/results/llm_ptq.{json,md} and llm_ptq.png atomically (partial results per plan).
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from smpq import strategy  # noqa: E402
from smpq.alloc import count_feasible  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.fileio import atomic_write_text  # noqa: E402
from smpq.transformer import values  # noqa: E402
from smpq.transformer.mixed import MixedConfig, choice_scores  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings  # noqa: E402

log = logging.getLogger("llm_ptq")
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(".cache/smpq/llm_ptq")
CANDIDATES = "int2g32,int3g32,int4g32,int8g32"
LM_METHODS = strategy.names("transformer")  # shapley and its variants, then the baselines
METHODS = tuple(m for m in LM_METHODS if m == "shapley" or not m.startswith("shapley"))


@dataclass(frozen=True)
class Plan:
    model: str
    backend: str
    settings: RunSettings
    shapley: MixedConfig
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]
    methods: tuple[str, ...] = METHODS

    @property
    def name(self) -> str:
        return f"{self.model}/{self.backend}"


def plans(quick: bool) -> list[Plan]:
    if quick:
        lm = RunSettings(calib_blocks=4, val_blocks=4, test_blocks=16)
        enc = RunSettings(calib_pairs=8, val_pairs=8, test_pairs=16, max_length=48)
        sh = MixedConfig(permutations=4, tolerance=None, min_permutations=2)
        return [Plan("tiny-lm", "rtn", lm, sh, (0,), (3.0, 4.0), LM_METHODS),
                Plan("minilm", "rtn", enc, replace(sh, permutations=2), (0,), (3.0,))]
    budgets = (2.5, 3.0, 3.5, 4.0, 4.5)
    lm = RunSettings(calib_blocks=8, val_blocks=16, test_blocks=64)
    enc = RunSettings(calib_pairs=16, val_pairs=32, test_pairs=64, max_length=64)
    sh = MixedConfig(permutations=48, tolerance=0.005, min_permutations=8, max_evaluations=2400)
    return [Plan("tiny-lm", "rtn", lm, sh, (0, 1, 2), budgets, LM_METHODS),
            Plan("minilm", "rtn", enc, replace(sh, permutations=8), (0,), budgets),
            Plan("tiny-lm", "gptq", lm, sh, (0,), budgets)]


# ----------------------------------------------------------------------------- evaluation


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()


class Evaluator:
    """Per-item test metrics of the session's current weights (for paired comparisons)."""

    def __init__(self, session: PTQSession) -> None:
        self.s = session
        if session.kind == "encoder":
            rr = session.retrieval
            self.fq, self.fd = values.embed(session.model, rr.queries), values.embed(
                session.model, rr.documents)

    def items(self) -> tuple[np.ndarray, dict[str, float]]:
        """(per-item metric, higher is better; summary metrics)."""
        s = self.s
        if s.kind == "causal_lm":
            nll = []
            with torch.no_grad():
                for ids in s.test_blocks.split(s.settings.batch_size):
                    logits = values.lm_logits(s.model, ids)[:, :-1]
                    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                    nll.append(ce.double().mean(1))
            per = torch.cat(nll).numpy()
            return -per, {"test_perplexity": math.exp(per.mean()),
                          "test_kl": -s.value("test"), "val_kl": -s.value("val")}
        rr = s.retrieval
        q, d = values.embed(s.model, rr.queries), values.embed(s.model, rr.documents)
        per = torch.cat([(q * self.fq).sum(-1), (d * self.fd).sum(-1)]).double().numpy()
        scores = q @ d.T
        k = min(10, scores.shape[1])
        top_m, top_f = scores.topk(k, -1).indices, rr.scores.topk(k, -1).indices
        overlap = (top_m.unsqueeze(-1) == top_f.unsqueeze(-2)).any(-1).double().sum(-1) / k
        recall1 = (scores.argmax(-1) == torch.arange(len(scores))).double().mean()
        return per, {"test_cosine": float(per.mean()), "spearman": float(
            _spearman(scores, rr.scores).mean()), "top10_overlap": float(overlap.mean()),
            "recall_at_1": float(recall1), "val_cosine": 1.0 + s.value("val")}


# ----------------------------------------------------------------------------- one plan


@dataclass
class PlanRun:
    plan: Plan
    records: list[dict] = field(default_factory=list)
    costs: dict[str, list[dict]] = field(default_factory=dict)
    budgets: dict[str, dict] = field(default_factory=dict)
    items: dict[str, list[float]] = field(default_factory=dict)
    float_metrics: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _shapley(session: PTQSession, plan: Plan, seed: int, ladder: bool) -> tuple:
    cfg = replace(plan.shapley, seed=seed)
    tag = ("quick" if plan.shapley.permutations < 8 else "full") + ("" if ladder else "_literal")
    state = CACHE / plan.name.replace("/", "-") / f"shapley_state_seed{seed}_{tag}.json"
    try:
        res, game, cost = session.shapley(cfg, state, resume=True, ladder=ladder)
    except SmpqError as exc:  # a state of older settings: start afresh
        log.info("%s", exc)
        res, game, cost = session.shapley(cfg, state, resume=False, ladder=ladder)
    side = state.with_suffix(".cost.json")  # a finished run resumes with no work: keep its cost
    if cost["forward_passes"] == 0 and side.is_file():
        cost = json.loads(side.read_text()) | {"from_cache": True}
    else:
        atomic_write_text(side, json.dumps(cost) + "\n")
    return res, game, cost


def _scores(session: PTQSession, plan: Plan, method: str, seed: int, memo: dict) -> tuple:
    """(scores, cost, Shapley result or None); shapley_pairwise reuses shapley's estimates."""
    if method.startswith("shapley"):
        ladder = method != "shapley_literal"
        if (seed, ladder) not in memo:
            memo[seed, ladder] = _shapley(session, plan, seed, ladder)
        res, _, cost = memo[seed, ladder]
        return choice_scores(res.estimate, len(session.groups), len(session.specs)), cost, res
    scores, _, cost = session.baseline(method)
    return scores, cost, None


def run_plan(plan: Plan) -> PlanRun:
    out = PlanRun(plan)
    t0 = time.perf_counter()
    session = PTQSession(plan.model, plan.backend, CANDIDATES, plan.settings,
                         CACHE / plan.name.replace("/", "-"))
    session.prepare()
    log.info("%s: session ready in %.0fs (%d groups, %d candidates built, %d cached)", plan.name,
             time.perf_counter() - t0, len(session.groups), session.candidates.built,
             session.candidates.loaded)
    ev = Evaluator(session)
    out.float_metrics = session.float_metrics()
    cache: dict[tuple[int, ...], tuple[np.ndarray, dict]] = {}
    memo: dict = {}
    for method in plan.methods:
        seeds = plan.seeds if method in ("shapley", "shapley_pairwise") else (
            plan.seeds[:1] if method.startswith("shapley") else (None,))
        for seed in seeds:
            scores, cost, res = _scores(session, plan, method, seed or 0, memo)
            out.costs.setdefault(method, []).append(cost)
            log.info("%s %s seed %s: scores in %.1fs", plan.name, method, seed, cost["seconds"])
            for bits in plan.budgets:
                budget = Budget.parse(f"avg_bits={bits}")
                t_alloc = time.perf_counter()
                alloc = session.allocate(method, scores, budget, res, plan.shapley)
                if method == "shapley_pairwise":
                    cost.setdefault("milp_seconds", []).append(time.perf_counter() - t_alloc)
                choice = alloc if isinstance(alloc, tuple) else alloc.choice
                if choice not in cache:
                    keys = session.candidates.keys
                    with session.swapper.applied({n: keys[k] for g, k in zip(
                            session.groups, choice, strict=True) for n in g}):
                        cache[choice] = ev.items()
                per, metrics = cache[choice]
                key = f"{method}|{seed}|{bits}"
                out.items[key] = per.tolist()
                out.records.append({
                    "method": method, "seed": seed, "avg_bits": bits, **metrics,
                    "formats": [int(np.sum(np.array(choice) == k)) for k in range(4)],
                    "binding": list(getattr(alloc, "binding", ())),
                    "achieved_avg_bits": _avg_bits(session, choice)})
    for bits in plan.budgets:
        costs, limits, _ = session.budget_costs(Budget.parse(f"avg_bits={bits}"))
        fc = count_feasible(costs, limits)
        out.budgets[str(bits)] = {"log10_feasible": fc.log10, "exact": fc.exact}
    log.info("%s done in %.0fs", plan.name, time.perf_counter() - t0)
    return out


def _avg_bits(session: PTQSession, choice: tuple[int, ...]) -> float:
    total = sum(session.cost.layers[n].params * session.specs[k].bits
                for g, k in zip(session.groups, choice, strict=True) for n in g)
    return total / session.cost.total_params


# ----------------------------------------------------------------------------- reporting


def _metric(kind_lm: bool) -> tuple[str, str, bool]:
    """(key, label, lower is better)."""
    return ("test_perplexity", "test perplexity (per byte)", True) if kind_lm else (
        "test_cosine", "test embedding cosine to float", False)


def _cell(vals: list[float], fmt: str) -> str:
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{np.mean(vals):{fmt}} ± {np.std(vals, ddof=1):{fmt}}"


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = a - b
    se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
    return float(diff.mean()), float(se)


def verdicts(run: dict) -> dict[str, dict]:
    """Per budget: best method by mean per-item metric (seed-averaged items) against the best
    method whose policy differs from it ("win" needs diff > 2 paired stderr), and Shapley
    against the best baseline (methods not named shapley*)."""
    out = {}
    for bits in run["plan"]["budgets"]:
        means: dict[str, list[np.ndarray]] = {}
        for key, per in run["items"].items():
            method, _, b = key.split("|")
            if float(b) == bits:
                means.setdefault(method, []).append(np.asarray(per))
        avg = {m: np.mean(v, axis=0) for m, v in means.items()}
        order = sorted(avg, key=lambda m: -avg[m].mean())
        best = order[0]
        rivals = [m for m in order[1:] if not np.allclose(avg[m], avg[best], rtol=0, atol=1e-12)]
        row: dict = {"best": best, "same_as_best": [m for m in order[1:] if m not in rivals],
                     "runner_up": rivals[0] if rivals else None}
        if rivals:
            row["diff"], row["stderr"] = _paired(avg[best], avg[rivals[0]])
            row["verdict"] = "win" if row["diff"] > 2 * row["stderr"] else "tie"
        else:
            row["diff"], row["stderr"], row["verdict"] = 0.0, 0.0, "all equal"
        base = [m for m in order if not m.startswith("shapley")]
        row["shapley_rank"] = order.index("shapley") + 1 if "shapley" in avg else None
        if "shapley" in avg and base:
            d, se = _paired(avg["shapley"], avg[base[0]])
            row["shapley_vs_best_baseline"] = {"baseline": base[0], "diff": d, "stderr": se}
        else:
            row["shapley_vs_best_baseline"] = None
        out[str(bits)] = row
    return out


def markdown(result: dict) -> str:
    lines = ["# LLM weight-only PTQ: allocation methods at equal average bits", "",
             f"Candidates {result['candidates']} (asymmetric, groups of 32); allocation by "
             "the same exact MILP for every method except uniform; seeds only matter for "
             "Shapley (mean ± std over seeds). Generated by benchmarks/llm_ptq.py"
             f"{' --quick' if result['quick'] else ''} in {result['seconds'] / 60:.1f} min.", ""]
    for run in result["runs"]:
        plan, lm = run["plan"], run["kind"] == "causal_lm"
        key, label, lower = _metric(lm)
        budgets = plan["budgets"]
        lines += [f"## {plan['model']} / {plan['backend']}", ""]
        if lm:
            lines += [f"Float test perplexity: {run['float']['test_perplexity']:.4f}.", ""]
        for metric, title, fmt in ((key, label, ".4f"),
                                   ("test_kl" if lm else "spearman",
                                    "test KL to float (nats/token)" if lm else
                                    "retrieval Spearman vs float scores", ".5f" if lm else ".4f"),
                                   ("val_kl" if lm else "val_cosine",
                                    "validation KL (what a search may look at)" if lm else
                                    "validation cosine", ".5f")):
            lines += [f"### {title}", "", "| method | " + " | ".join(
                f"{b:g} bits" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
            for method in plan["methods"]:
                cells = [_cell([r[metric] for r in run["records"] if r["method"] == method
                                and r["avg_bits"] == b], fmt) for b in budgets]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        if not lm:
            lines += ["### recall@1 of the quantized model (float: "
                      f"{run['float'].get('float_recall_at_1', float('nan')):.3f})", "",
                      "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                      "|---" * (len(budgets) + 1) + "|"]
            for method in plan["methods"]:
                cells = [_cell([r["recall_at_1"] for r in run["records"] if r["method"] == method
                                and r["avg_bits"] == b], ".3f") for b in budgets]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### per budget: feasible policies, best method, noise", "",
                  "| avg bits | log10 feasible | best (same policy) | next different | "
                  "paired diff ± se | verdict | Shapley rank | Shapley - best baseline ± se |",
                  "|---" * 8 + "|"]
        for b in budgets:
            v, f = run["verdicts"][str(b)], run["budgets"][str(b)]
            sv = v["shapley_vs_best_baseline"]
            sh = f"{sv['diff']:+.5f} ± {sv['stderr']:.5f} (vs {sv['baseline']})" if sv else "-"
            same = f" (= {', '.join(v['same_as_best'])})" if v["same_as_best"] else ""
            lines.append(f"| {b:g} | {f['log10_feasible']:.1f} | {v['best']}{same} | "
                         f"{v['runner_up'] or '-'} | {v['diff']:+.5f} ± {v['stderr']:.5f} | "
                         f"{v['verdict']} | {v['shapley_rank']} | {sh} |")
        unit = "negative NLL per block" if lm else "cosine per text"
        lines += ["", f"Paired differences are in {unit} (higher is better).", "",
                  "### search cost (scoring only; candidates are shared)", "",
                  "| method | seconds | ratio to hessian | forward passes | backward passes |",
                  "|---|---|---|---|---|"]
        ref = np.mean([c["seconds"] for c in run["costs"].get("hessian", [{"seconds": 1}])])
        for method in plan["methods"]:
            cs = run["costs"][method]
            sec = np.mean([c["seconds"] for c in cs])
            fwd = np.mean([c["forward_passes"] for c in cs])
            lines.append(f"| {method} | {sec:.1f} | {sec / ref:.1f}x | {fwd:.0f} | "
                         f"{np.mean([c['backward_passes'] for c in cs]):.0f} |")
        lines.append("")
    lines += ["## Notes", "",
              "- shapley: the ladder game (each group's players leave top-down) of "
              "smpq.transformer.mixed, v = -KL to float on the calibration blocks "
              "(MiniLM: minus the "
              "embedding cosine distance on calibration docstrings), antithetic permutations, "
              "additive choice scores, exact MILP. shapley_literal: the same game averaged over "
              "all orderings (biased against middle formats, see mixed.py). shapley_pairwise: "
              "the same estimates, mean-variance objective phi'q - lambda q'Kq, risk 1.",
              "- Shapley settings: " + "; ".join(
                  f"{r['plan']['model']}/{r['plan']['backend']}: "
                  f"{r['costs']['shapley'][0]['permutations']} permutations "
                  f"({r['costs']['shapley'][0]['stop_reason']}), seeds {r['plan']['seeds']}"
                  for r in result["runs"]) + ".",
              "- Baselines read the same calibration data (Hessians, gradients); fisher and "
              "gradxdw use the next-token NLL (MiniLM: in-batch contrastive loss).",
              "- No exhaustive oracle: 4^16 (tiny LM) and 4^24 (MiniLM) policies.",
              f"- torch threads: {result.get('torch_threads')}; seconds are from one shared "
              "2-core machine, compare ratios within a run only.", ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        key, label, _ = _metric(run["kind"] == "causal_lm")
        for method in run["plan"]["methods"]:
            bs = run["plan"]["budgets"]
            ys = [np.mean([r[key] for r in run["records"] if r["method"] == method
                           and r["avg_bits"] == b]) for b in bs]
            ax.plot(bs, ys, marker="o", label=method)
        ax.set_title(f"{run['plan']['model']} / {run['plan']['backend']}")
        ax.set_xlabel("average weight bits")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _to_dict(run: PlanRun, kind: str) -> dict:
    plan = run.plan
    d = {"plan": {"model": plan.model, "backend": plan.backend, "budgets": list(plan.budgets),
                  "methods": list(plan.methods), "seeds": list(plan.seeds),
                  "settings": {k: v for k, v in plan.settings.__dict__.items()
                               if k != "shapley"}, "shapley": plan.shapley.to_dict()},
         "kind": kind, "records": run.records, "costs": run.costs, "budgets": run.budgets,
         "float": run.float_metrics, "items": run.items}
    d["verdicts"] = verdicts(d)
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, 1 seed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", default="", help="comma list of plan names to run")
    parser.add_argument("--render", action="store_true",
                        help="only re-render llm_ptq.md / .png from the existing llm_ptq.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads ran the "
                             "tiny LM 40x slower, spinning against other jobs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        result = json.loads((args.out / "llm_ptq.json").read_text())
        for run in result["runs"]:
            run["verdicts"] = verdicts(run)
        atomic_write_text(args.out / "llm_ptq.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(args.out / "llm_ptq.md", markdown(result))
        plot(result, args.out / "llm_ptq.png")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"quick": args.quick, "candidates": CANDIDATES, "runs": [], "seconds": 0.0,
              "torch_threads": torch.get_num_threads(), "notes": []}
    for plan in plans(args.quick):
        if args.only and plan.name not in args.only.split(","):
            continue
        run = run_plan(plan)
        kind = "causal_lm" if plan.model == "tiny-lm" else "encoder"
        result["runs"].append(_to_dict(run, kind))
        result["seconds"] = time.perf_counter() - start
        atomic_write_text(args.out / "llm_ptq.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(args.out / "llm_ptq.md", markdown(result))
        plot(result, args.out / "llm_ptq.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
