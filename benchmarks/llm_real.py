"""Issue 19's benchmark: LLM allocators side by side at equal block-token budgets.

    PYTHONPATH=src nice python benchmarks/llm_real.py --part smollm2-135m:0   # one model, seed
    PYTHONPATH=src nice python benchmarks/llm_real.py --part minilm:0
    PYTHONPATH=src nice python benchmarks/llm_real.py --rss      # the default's peak RSS
    PYTHONPATH=src nice python benchmarks/llm_real.py --merge    # -> results/llm_real.*

One part is one `PTQSession` (model, calibration text from `RunSettings.calib_seed`, float
references and candidate weights built once), RTN int2/3/4/8 g32 candidates, and every method
at every budget (avg_bits). Only the allocation differs between methods: every allocation,
AutoScheme's too, is applied with the session's own candidate weights.

Compute. Every search (`shapley-loop`, `evopress`, `local`, `random`) gets the same budget of
block-tokens (tokens x transformer blocks run): `--evaluations` full forwards over the
calibration blocks. Prefix reuse makes forwards that change only late blocks cheaper, and the
searches that screen on fewer blocks (evopress, shapley-loop's guided phase) pay less per
screen: the budget buys different numbers of evaluations. What each search spent (its scores
included: Fisher, the start of `local` and the prior of `shapley-loop`) is reported; the
cheap scores (`fisher`, `gradxdw`, `uniform`) and AutoScheme report their own cost (a backward
counts as two forwards; AutoScheme's in wall seconds only: its passes are internal).

Quality. Causal LMs: perplexity on `--test-blocks` x `--test-len` tokens of Wikipedia test
articles (disjoint from calibration and validation). Encoders (MiniLM): the test pairs'
embedding cosine distance to the float model's (1 - cosine; lower is better) and retrieval.
For the quality-vs-compute figure, each search's incumbent at half its budget is tested too
(`--half`).

Time. Wall seconds of every method measured in the same process, one after another;
AutoScheme's one run serves all budgets; `alloc_seconds_over_autoscheme` compares the
default's slowest budget (scores and searches included) with it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpq import strategy
from smpq.cost import Budget
from smpq.fileio import atomic_write_text
from smpq.strategy import SearchProblem
from smpq.transformer import values
from smpq.transformer.mixed import DEFAULT_CANDIDATES, spec_key
from smpq.transformer.run import PTQSession, RunSettings

RESULTS = Path(__file__).parent / "results"
PARTS = RESULTS / "llm_real_parts"
OURS = "shapley-loop"
SEARCHES = ("shapley-loop", "evopress", "local", "random")
CHEAP = ("fisher", "gradxdw", "uniform")
PEERS = ("autoscheme",)


def _settings(args: argparse.Namespace, seed: int) -> RunSettings:
    return RunSettings(block=128, calib_tokens=args.calib_tokens, val_blocks=4, test_blocks=4,
                       test_pairs=args.test_pairs, cache_dir=args.cache, calib_seed=seed)


class Tester:
    """Test quality of an assignment, memoised (methods often agree on a policy)."""

    def __init__(self, session: PTQSession, args: argparse.Namespace):
        self.s, self.memo = session, {}
        self.blocks = None
        if session.kind == "causal_lm":
            from smpq.transformer.wiki import wiki_blocks

            self.blocks = wiki_blocks(session.tokenizer, "test", args.test_len,
                                      args.test_blocks)

    def float_quality(self) -> dict[str, float]:
        self.s.swapper.restore()
        return self._measure()

    def _measure(self) -> dict[str, float]:
        s = self.s
        if self.blocks is not None:
            return {"test_perplexity": values.perplexity(s.model, self.blocks,
                                                         s.settings.batch_size)}
        out = {"test_distance": -s.value("test")}
        out.update(values.retrieval_report(s.model, s.retrieval, min(
            10, s.retrieval.scores.shape[1])))
        return out

    def __call__(self, assignment: dict[str, str]) -> dict[str, float]:
        key = json.dumps(sorted(assignment.items()))
        if key not in self.memo:
            with self.s.swapper.applied(assignment):
                self.memo[key] = self._measure()
        return dict(self.memo[key])


def _bits(session: PTQSession, assignment: dict[str, str]) -> float:
    by_key = {spec_key(s): s for s in session.specs}
    total = sum(m.weight.numel() for m in session.linears.values())
    return sum(session.linears[n].weight.numel() * by_key[k].bits
               for n, k in assignment.items()) / total


def _metric(session: PTQSession) -> str:
    return "test_perplexity" if session.kind == "causal_lm" else "test_distance"


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity_check(session: PTQSession, bits: float, seed: int, n: int, low: int) -> dict:
    """Spearman between the value on the first `low` calibration blocks and on all of them,
    over `n` policies a search would compare: level switches of Fisher's allocation and
    random policies on the budget frontier."""
    from smpq.transformer.engine_strategy import SessionValue, policy_space, unit_ladders
    from smpq.transformer.policy_search import local_moves

    budget = Budget.parse(f"avg_bits={bits:g}")
    resolved = session.resolve(budget)
    space, order = policy_space(session, budget, resolved)
    ladders = unit_ladders(session, order)
    fisher = strategy.get("fisher", "transformer")(SearchProblem(
        session, session.cost, budget, session.specs, seed=seed,
        options={"resolved": resolved})).detail.choice
    ranks = [{int(c): k for k, c in enumerate(lad)} for lad in ladders]
    base = np.array([r[int(c)] for r, c in zip(ranks, fisher, strict=True)], np.int64)
    rng = np.random.default_rng(seed)
    pols = [base]
    for u, v in local_moves(space, base, rng)[: n // 2]:
        c = base.copy()
        c[u] += 1
        c[v] -= 1
        pols.append(c)
    pols += list(space.random_maximal(rng, n - len(pols)))
    value = SessionValue(session, ladders, cache_bytes=0)
    try:
        lo = value(np.array(pols), n_blocks=low).tolist()
        hi = value(np.array(pols)).tolist()
    finally:
        session.swapper.restore()
    return {"avg_bits": bits, "policies": len(pols), "low_blocks": low,
            "full_blocks": int(len(session.refs["calib"].blocks)),
            "spearman": _spearman(lo, hi), "low": lo, "full": hi}


def run_part(model: str, seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(stage: str, done: int, total: int) -> None:
        if done in (0, total) or done % 8 == 0:
            print(f"[{model}:{seed} {time.perf_counter() - start:7.1f}s] {stage} "
                  f"{done}/{total}", flush=True)

    budgets = [float(b) for b in args.budgets.split(",")]
    session = PTQSession(model, "rtn", DEFAULT_CANDIDATES, _settings(args, seed), progress=log)
    t = time.perf_counter()
    session.prepare()
    prepare_s = time.perf_counter() - t
    tester = Tester(session, args)
    float_q = tester.float_quality()
    metric = _metric(session)
    rows: list[dict[str, Any]] = []
    methods = [m for m in args.methods.split(",") if m]
    if session.kind != "causal_lm":
        methods = [m for m in methods if m not in PEERS]  # AutoScheme: causal LMs only
    full_price = None
    for bits in budgets:
        budget = Budget.parse(f"avg_bits={bits:g}")
        resolved = session.resolve(budget)
        for name in [m for m in methods if m not in PEERS]:
            t = time.perf_counter()
            res = strategy.get(name, "transformer")(SearchProblem(
                session, session.cost, budget, session.specs, seed=seed, options={
                    "n_evaluations": args.evaluations, "resolved": resolved}))
            wall = time.perf_counter() - t
            assignment = session.assignment(tuple(res.detail.choice))
            cost = res.detail.cost
            row = {"model": model, "seed": seed, "avg_bits": bits, "method": name,
                   "seconds": wall, "evaluations": cost.get("evaluations"),
                   "block_tokens": cost.get("block_tokens"),
                   "evaluation_block_tokens": cost.get("evaluation_block_tokens"),
                   "prefix_reuse_saving": cost.get("prefix_reuse_saving"),
                   "forward_passes": cost.get("forward_passes"),
                   "backward_passes": cost.get("backward_passes"),
                   "fits": all(r["ok"] for r in budget.check(session.cost, res.policy)),
                   "bits": _bits(session, assignment), **tester(assignment)}
            trace = cost.get("trace")
            if trace:
                offset = int(cost["block_tokens"]) - int(cost["evaluation_block_tokens"])
                row["trace"] = [[offset + b, v] for b, v, _ in trace]
                cap = args.evaluations * _price(session)
                full_price = _price(session)
                row["budget_block_tokens"] = cap
                if args.half:
                    half = [c for b, _, c in trace if b <= cap // 2] or [trace[0][2]]
                    row["half"] = {"block_tokens": offset + cap // 2,
                                   **tester(session.assignment(tuple(half[-1])))}
            if name == OURS and "engine" in res.info:
                eng = res.info["engine"]
                row["credits"] = {"players": len(eng["players"]), "with_stderr": sum(
                    1 for p in eng["players"] if p.get("stderr") is not None)}
                guided = [r["guided"] for r in eng["rounds"] if "guided" in r]
                row["guided"] = guided[0] if guided else None
            rows.append(row)
            print(f"  {model}:{seed} {bits} {name}: {metric} {row[metric]:.4f} in {wall:.1f}s "
                  f"({row['block_tokens']} block-tokens)", flush=True)
    as_cost: dict = {}
    if any(m in PEERS for m in methods):
        from smpq.transformer.peers import autoscheme_allocation

        try:
            found, as_cost = autoscheme_allocation(session, budgets)
        except Exception as e:  # a peer's failure is a result to report, not a crash
            print(f"  autoscheme failed: {type(e).__name__}: {e}", flush=True)
            found, as_cost = {}, {"seconds": None, "error": f"{type(e).__name__}: {e}"}
        for bits, assignment in found.items():
            rows.append({"model": model, "seed": seed, "avg_bits": bits,
                         "method": "autoscheme", "seconds": as_cost["seconds"],
                         "seconds_note": "one scoring run for all budgets",
                         "evaluations": None, "fits": _bits(session, assignment) <= bits + 1e-9,
                         "bits": _bits(session, assignment), **tester(assignment)})
            print(f"  {model}:{seed} {bits} autoscheme: {metric} {rows[-1][metric]:.4f}",
                  flush=True)
    fidelity = None
    if args.fidelity and session.kind == "causal_lm":
        n_blocks = len(session.refs["calib"].blocks)
        fidelity = fidelity_check(session, budgets[0], seed, args.fidelity, max(1, n_blocks // 4))
        print(f"  fidelity spearman {fidelity['spearman']:.3f}", flush=True)
    part = {"model": model, "seed": seed, "autoscheme": as_cost or None, "metric": metric,
            "float": float_q, "prepare_seconds": prepare_s, "full_block_tokens": full_price,
            "settings": vars(args) | {"part": None}, "data": session.data_info,
            "test_tokens": (list(tester.blocks.shape) if tester.blocks is not None else
                            args.test_pairs),
            "fidelity": fidelity, "rows": rows,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": time.perf_counter() - start}
    PARTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(PARTS / f"{model}_seed{seed}.json", json.dumps(part, indent=1) + "\n")
    return part


def _price(session: PTQSession) -> int:
    from smpq.transformer.prefix import transformer_blocks

    ref = session.refs["calib"]
    tokens = (ref.blocks.numel() if hasattr(ref, "blocks") else
              sum(b["input_ids"].numel() for b in ref.inputs.batches))  # encoders: padded
    return int(tokens) * transformer_blocks(session.model)


# ------------------------------------------------------------------------------ merge


def _by(rows: list[dict], *keys: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _table(rows: list[dict], metric: str) -> list[dict]:
    table = []
    for (model, bits, method), rs in sorted(_by(rows, "model", "avg_bits", "method").items()):
        q = [r[metric] for r in rs]
        secs = [r["seconds"] for r in rs if r["seconds"] is not None]
        bt = [r["block_tokens"] for r in rs if r.get("block_tokens") is not None]
        table.append({"model": model, "avg_bits": bits, "method": method, "seeds": len(rs),
                      "mean": statistics.fmean(q), "min": min(q), "max": max(q),
                      "seconds_mean": statistics.fmean(secs) if secs else None,
                      "block_tokens_mean": statistics.fmean(bt) if bt else None,
                      "evaluations_mean": statistics.fmean(
                          [r["evaluations"] for r in rs if r.get("evaluations")] or [0]),
                      "all_fit": all(r["fits"] for r in rs)})
    return table


def _paired(rows: list[dict], metric: str) -> dict:
    """Per budget: ours / best other (means over seeds), paired gaps per seed, our spread."""
    out = {}
    for bits, rs in sorted(_by(rows, "avg_bits").items()):
        bits = bits[0]
        by_method = _by(rs, "method")
        ours = {r["seed"]: r[metric] for r in by_method.get((OURS,), [])}
        if not ours:
            continue
        means = {m[0]: statistics.fmean(r[metric] for r in g) for m, g in by_method.items()
                 if m[0] != OURS and all(r["fits"] for r in g)}
        if not means:
            continue
        best = min(means, key=means.__getitem__)
        ours_mean = statistics.fmean(ours.values())
        theirs = {r["seed"]: r[metric] for r in by_method[(best,)]}
        gaps = [theirs[s] - ours[s] for s in ours if s in theirs]
        spread = max(ours.values()) - min(ours.values())
        verdict = ("win" if gaps and min(gaps) > 0 and statistics.fmean(gaps) > spread else
                   "loss" if gaps and max(gaps) < 0 and -statistics.fmean(gaps) > spread else
                   "tie")
        out[f"{bits:g}"] = {"ours": ours_mean, "best_other": best,
                            "best_other_mean": means[best], "ratio": ours_mean / means[best],
                            "paired_gaps": gaps, "our_seed_spread": spread, "verdict": verdict,
                            "rank": 1 + sum(1 for v in means.values() if v < ours_mean)}
    return out


def summarize(parts: list[dict]) -> dict:
    llm = [p for p in parts if p["metric"] == "test_perplexity"]
    enc = [p for p in parts if p["metric"] != "test_perplexity"]
    rows = [r for p in llm for r in p["rows"]]
    erows = [r for p in enc for r in p["rows"]]
    paired = _paired(rows, "test_perplexity")
    epaired = _paired(erows, "test_distance")
    ours_s = {(r["seed"], r["avg_bits"]): r["seconds"] for r in rows if r["method"] == OURS}
    per_part = []
    for p in llm:
        a = (p.get("autoscheme") or {}).get("seconds")
        mine = [s for (seed, _), s in ours_s.items() if seed == p["seed"]]
        if a and mine:
            per_part.append(max(mine) / a)
    saving = [r["prefix_reuse_saving"] for r in rows
              if r["method"] == OURS and r.get("prefix_reuse_saving") is not None]
    fid = [p["fidelity"]["spearman"] for p in llm if p.get("fidelity")]
    prices = [p["full_block_tokens"] for p in llm if p.get("full_block_tokens")]
    evals = llm[0]["settings"]["evaluations"] if llm else None
    peers = sorted({r["method"] for r in rows} - {OURS})
    rss = RESULTS / "llm_real_rss.json"
    rss_ratio = json.loads(rss.read_text()).get("peak_rss_over_model") if rss.is_file() else None
    summary = {
        "ppl_ratio_vs_best_other": {k: v["ratio"] for k, v in paired.items()},
        "alloc_seconds_over_autoscheme": max(per_part) if per_part else None,
        "block_tokens_per_search": (evals * prices[0]) if prices and evals else None,
        "prefix_reuse_saving": statistics.fmean(saving) if saving else None,
        "fidelity_spearman": statistics.fmean(fid) if fid else None,
        "peers": peers,
        "minilm_rank_of_default": ({k: v["rank"] for k, v in epaired.items()} or None),
        "peak_rss_over_model": rss_ratio,
        "targets": {"ppl_ratio_vs_best_other": "<= 0.85 at 2.5, <= 1.0 at 3 and 3.5",
                    "alloc_seconds_over_autoscheme": "<= 1.0",
                    "peak_rss_over_model": "<= 3"},
        "verdicts": {k: v["verdict"] for k, v in paired.items()},
        "best_other": {k: v["best_other"] for k, v in paired.items()},
        "alloc_seconds_over_autoscheme_per_seed": per_part,
    }
    return {"summary": summary, "paired": paired, "minilm_paired": epaired,
            "table": _table(rows, "test_perplexity"),
            "minilm_table": _table(erows, "test_distance") if erows else [],
            "fidelity": [p["fidelity"] for p in llm if p.get("fidelity")],
            "parts": [{k: v for k, v in p.items() if k != "rows"} for p in parts],
            "rows": rows + erows}


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["# LLM allocators at equal compute (issue 19)", "",
             f"Every search gets {s['block_tokens_per_search']} block-tokens (tokens x "
             "transformer blocks; see the module docstring of benchmarks/llm_real.py). "
             "SmolLM2-135M, RTN int2/3/4/8 g32; test perplexity on held-out Wikipedia text "
             "(lower is better).", "",
             "| summary | value | target |", "|---|---|---|"]
    for k in ("ppl_ratio_vs_best_other", "alloc_seconds_over_autoscheme",
              "block_tokens_per_search", "prefix_reuse_saving", "fidelity_spearman", "peers",
              "minilm_rank_of_default", "peak_rss_over_model"):
        v = s.get(k)
        v = (f"{v:.4g}" if isinstance(v, float) else json.dumps(v, default=float)
             ) if v is not None else "n/a"
        lines.append(f"| {k} | {v} | {s['targets'].get(k, '')} |")
    lines += ["", "| avg bits | ours | best other | ratio | paired gaps (other - ours) | "
              "our seed spread | verdict |", "|---|---|---|---|---|---|---|"]
    for k, v in res["paired"].items():
        gaps = ", ".join(f"{g:+.2f}" for g in v["paired_gaps"])
        lines.append(f"| {k} | {v['ours']:.2f} | {v['best_other']} {v['best_other_mean']:.2f} "
                     f"| {v['ratio']:.3f} | {gaps} | {v['our_seed_spread']:.2f} | "
                     f"{v['verdict']} |")
    for title, table, fmt in (("SmolLM2-135M, test perplexity", res["table"], ".2f"),
                              ("all-MiniLM-L6-v2, test embedding distance (1 - cosine)",
                               res["minilm_table"], ".5f")):
        if not table:
            continue
        lines += ["", f"## {title}", "", "| avg bits | method | seeds | mean | min–max | "
                  "block-tokens | evaluations | seconds |", "|---|---|---|---|---|---|---|---|"]
        for r in table:
            sec = f"{r['seconds_mean']:.0f}" if r["seconds_mean"] is not None else "n/a"
            bt = f"{r['block_tokens_mean']:.3g}" if r["block_tokens_mean"] else "n/a"
            fit = "" if r["all_fit"] else " (over budget)"
            lines.append(f"| {r['avg_bits']:g} | {r['method']}{fit} | {r['seeds']} | "
                         f"{r['mean']:{fmt}} | {r['min']:{fmt}}–{r['max']:{fmt}} | {bt} | "
                         f"{r['evaluations_mean']:.0f} | {sec} |")
    lines += ["", "Float: " + ", ".join(f"{p['model']}:{p['seed']} " + ", ".join(
        f"{k} {v:.4g}" for k, v in p["float"].items()) for p in res["parts"]) + "."]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


NOTES = (  # how the committed results were produced (2026-12-08)
    "Machine: the shared 2-core machine with three SmolLM2 parts at once (one thread each), "
    "plus a MiniLM part at nice 10 and, for part of the time, the test suite and the peak-RSS "
    "run: wall times are inflated, alike within a part; alloc_seconds_over_autoscheme is "
    "taken per part (the default's slowest budget over AutoScheme's one run in the same "
    "process) and its largest value is reported.",
    "Budget: 16 full forwards over the 8 x 128 calibration tokens = 491,520 block-tokens of "
    "evaluations per search. The block-tokens column adds the scores a search reads (Fisher: "
    "a forward and a backward over the calibration text, 92,160), so shapley-loop and local "
    "show about 0.52-0.6M; an evaluation may overrun the cap by one forward (random, local).",
    "Test: perplexity on 32 x 512 tokens of Wikipedia test articles (disjoint from "
    "calibration and validation), every allocation applied with the session's own RTN "
    "candidates; MiniLM: 1 - cosine to the float embeddings on 64 held-out docstring pairs.",
    "EvoPress's SmolLM2 rows ran before its last-stage fix (a stage the cap pays only part of "
    "is now cut, not skipped): it left 6-11% of its budget unspent there. It starts from the "
    "uniform policy, as EvoPress does, which at 2.5 bits is a poor start for 16 forwards.",
    "AutoScheme reports wall seconds only (its passes run inside auto-round); one scoring run "
    "serves the three budgets.",
    "The traces in these results carry the block-tokens spent after each batch of "
    "evaluations, not after each one (fixed after the run): shapley-loop's first points sit "
    "at the end of its screening batch in the lower panels.",
    "Seed 0 was restarted once without the half-budget test points (to fit the session), so "
    "the figure shows each method's end point, not its curve; the lower panels show the "
    "searches' calibration value against block-tokens.",
)


def plot(res: dict, path: Path) -> None:
    """Quality against compute at 2.5 and 3 bits: test perplexity of every method against
    the block-tokens it spent (mean over seeds, bars min-max; `--half` adds each search's
    incumbent at half its budget), and below it the searches' best calibration value
    (-log KL) against block-tokens, one thin line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "test_perplexity" in r]
    budgets = [b for b in (2.5, 3.0) if any(r["avg_bits"] == b for r in rows)]
    if not budgets:
        return
    fig, axes = plt.subplots(2, len(budgets), figsize=(6.5 * len(budgets), 8), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for col, bits in enumerate(budgets):
        top, bottom = axes[0][col], axes[1][col]
        here = [r for r in rows if r["avg_bits"] == bits]
        for method in methods:
            rs = [r for r in here if r["method"] == method]
            if not rs:
                continue
            ours = method == OURS
            if all(r.get("block_tokens") is None for r in rs):  # AutoScheme: seconds only
                top.axhline(statistics.fmean(r["test_perplexity"] for r in rs), ls="--",
                            color=colors[method], label=f"{method} (no block-token count)")
                continue
            pts = {}
            for r in rs:
                if r.get("half"):
                    pts.setdefault("half", []).append((r["half"]["block_tokens"],
                                                       r["half"]["test_perplexity"]))
                pts.setdefault("end", []).append((r.get("block_tokens") or 0,
                                                  r["test_perplexity"]))
            xy = [(statistics.fmean(x for x, _ in v), statistics.fmean(y for _, y in v),
                   min(y for _, y in v), max(y for _, y in v)) for v in pts.values()]
            xy.sort()
            xs, ys = [p[0] for p in xy], [p[1] for p in xy]
            err = [[p[1] - p[2] for p in xy], [p[3] - p[1] for p in xy]]
            top.errorbar(xs, ys, yerr=err, marker="o" if ours else "s", capsize=3,
                         color="k" if ours else colors[method], lw=2.5 if ours else 1,
                         label=method, zorder=5 if ours else 2)
            for r in rs:
                if r.get("trace"):
                    tx, tv = zip(*r["trace"], strict=True)
                    bottom.step(tx, tv, where="post", lw=2 if ours else 0.8, alpha=0.8,
                                color="k" if ours else colors[method],
                                label=method if r is rs[0] else None)
        top.set_yscale("log")
        top.set_xlabel("block-tokens spent (tokens x transformer blocks)")
        top.set_ylabel("test perplexity (mean over seeds, min-max)")
        top.set_title(f"SmolLM2-135M at {bits:g} average bits")
        top.legend(fontsize=7)
        bottom.set_xlabel("block-tokens spent")
        bottom.set_ylabel("best calibration value so far (-log KL)")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge() -> dict:
    parts = [json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))]
    if not parts:
        raise SystemExit("no parts in benchmarks/results/llm_real_parts; run --part first")
    res = summarize(parts)
    atomic_write_text(RESULTS / "llm_real.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(RESULTS / "llm_real.md", markdown(res))
    plot(res, RESULTS / "llm_real.png")
    return res


def rss(args: argparse.Namespace) -> dict:
    """Peak RSS of the default `smpq ptq` on SmolLM2 (defaults, 2.5 bits), in this fresh
    process: what a user's run needs, against the float model's bytes."""
    from smpq.transformer.run import run_ptq

    torch.set_num_threads(1)
    out = Path(args.cache).parent / "rss_run"
    summary = run_ptq("smollm2-135m", "avg_bits=2.5", out=out,
                      settings=RunSettings(cache_dir=args.cache))
    keys = ("peak_rss_bytes", "model_bytes", "peak_rss_over_model", "seconds", "block_tokens")
    res = {k: summary.get(k) for k in keys} | {
        "command": "smpq ptq --model smollm2-135m --budget avg_bits=2.5 (defaults)",
        "search_cost": {k: v for k, v in summary["search_cost"].items() if k != "trace"}}
    atomic_write_text(RESULTS / "llm_real_rss.json", json.dumps(res, indent=1) + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", help="MODEL:SEED, e.g. smollm2-135m:0 or minilm:1")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--budgets", default="2.5,3,3.5")
    ap.add_argument("--methods", default=",".join((*SEARCHES, *CHEAP, *PEERS)))
    ap.add_argument("--evaluations", type=int, default=16,
                    help="every search's budget, in full forwards over the calibration text")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--test-blocks", type=int, default=32)
    ap.add_argument("--test-len", type=int, default=512)
    ap.add_argument("--test-pairs", type=int, default=64, help="encoders' test pairs")
    ap.add_argument("--half", action="store_true",
                    help="also test each search's incumbent at half its budget")
    ap.add_argument("--fidelity", type=int, default=0,
                    help="policies for the low/full fidelity Spearman (0: skip)")
    ap.add_argument("--cache", default=".cache/smpq")
    ap.add_argument("--rss", action="store_true",
                    help="measure the default smpq ptq's peak RSS on SmolLM2 (its own process)")
    args = ap.parse_args()
    if args.rss:
        print(json.dumps(rss(args), indent=1))
        return
    if args.part:
        model, _, seed = args.part.partition(":")
        run_part(model, int(seed or 0), args)
    if args.merge:
        res = merge()
        print(json.dumps(res["summary"], indent=1, default=float))
    if not args.part and not args.merge:
        ap.error("give --part MODEL:SEED and/or --merge")


if __name__ == "__main__":
    main()
