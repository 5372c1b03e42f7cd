"""Issue 13's benchmark: allocators on SmolLM2-135M side by side, re-quantized alike.

    PYTHONPATH=src nice python benchmarks/llm_real.py --part rtn:0     # one backend, one seed
    PYTHONPATH=src nice python benchmarks/llm_real.py --merge          # -> results/llm_real.*

Every part is one `PTQSession` (model, text, float references and candidate weights built
once), one backend and one calibration seed (`RunSettings.calib_seed`: which Wikipedia
calibration blocks), and every method at every budget (avg_bits 2.5 / 3 / 3.5 over
int2/3/4/8 g32). Parts are separate processes so they run side by side; `--merge` reads
them all. Only the allocation differs between methods: each allocation, AutoScheme's too, is
applied with the session's own candidate weights (same backend, same quantizer), and scored
by perplexity on the Wikipedia test split (articles disjoint from calibration).

Methods: the default `shapley-loop` (engine, Fisher as its prior feature and first policy),
`random` and `local` (whole-policy searches with the same evaluation budget and value), the cheap
scores `fisher`, `gradxdw`, `hessian`, `relerr`, `uniform`, and Intel AutoRound's AutoScheme
(`smpq.transformer.peers`; one scoring per part serves all budgets, its wall time is that
one run). Today's ladder Shapley (`shapley`) is not in the default list: its smallest run, one
permutation of 120 groups x 3 steps, is 361 evaluations, 15x the others' budget (`--methods`
adds it; `max_evaluations` then caps it at one permutation). Wall times are per method and
budget, measured in the same process on the same
(shared, 2-core) machine; the priors' scoring is counted in the searches that use them.

The summary (issue 13): ppl_ratio_2p5_vs_best_other (ours / best other at 2.5 bits, mean over
seeds), ppl_margin_3_min / ppl_margin_3p5_min (best other minus ours, the smallest over
seeds and backends), alloc_seconds_over_autoscheme (ours per budget / AutoScheme per run,
the largest), gguf_ppl_ratio_vs_llamacpp (from results/llm_gguf.json when present).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from smpq import strategy
from smpq.cost import Budget
from smpq.fileio import atomic_write_text
from smpq.strategy import SearchProblem
from smpq.transformer import values
from smpq.transformer.mixed import DEFAULT_CANDIDATES, MixedConfig, spec_key
from smpq.transformer.run import PTQSession, RunSettings

RESULTS = Path(__file__).parent / "results"
PARTS = RESULTS / "llm_real_parts"
OURS = "shapley-loop"
SEARCHES = ("shapley-loop", "random", "local")
CHEAP = ("fisher", "gradxdw", "hessian", "relerr", "uniform")
PEERS = ("autoscheme",)
NOTES = (  # how the committed results were produced (2026-11-30)
    "Sizes: 8 calibration blocks of 128 tokens (1,024 tokens; one value evaluation), 16 test "
    "blocks of 128; 24 evaluations per search (shapley-loop, random, local).",
    "Machine: the shared 2-core machine, with up to 7 benchmark processes at once (one thread "
    "each): one forward over the calibration text took 8-25 s instead of ~4.5 s idle, so every "
    "wall time here is inflated, and more for runs that overlapped more. AutoScheme ran last "
    "in each part, under lighter load (90 s for seed 0, 166 s for seeds 1-2).",
    "`shapley-loop@r1` is the engine before two fixes made during this run (with a prior, "
    "screen 2 random policies instead of 30% of the budget; on the budget frontier trade two "
    "units); `shapley-loop` rows are the rerun with the fixed engine on the same seeds and "
    "data (tag r2, separate processes).",
    "Seed 0's process was killed by the OOM killer during the 3.5-bit budget: its 2.5/3-bit "
    "rows are recovered from its progress log (llm_real_logs/rtn_seed0.log; perplexity and "
    "seconds only), and the 3.5-bit budget and AutoScheme were rerun (tag s0b35).",
    "GPTQ was not run (its candidate build alone was projected at over an hour on the loaded "
    "machine); today's ladder Shapley game is not run (one permutation is 361 evaluations).",
)


def _settings(args: argparse.Namespace, seed: int) -> RunSettings:
    return RunSettings(block=128, calib_tokens=args.calib_tokens, val_blocks=4,
                       test_blocks=args.test_blocks, cache_dir=args.cache, calib_seed=seed)


def _measure(session: PTQSession, assignment: dict[str, str]) -> dict[str, float]:
    with session.swapper.applied(assignment):
        return {"test_perplexity": values.perplexity(session.model, session.test_blocks,
                                                     session.settings.batch_size)}


def _bits(session: PTQSession, assignment: dict[str, str]) -> float:
    by_key = {spec_key(s): s for s in session.specs}
    total = sum(m.weight.numel() for m in session.linears.values())
    return sum(session.linears[n].weight.numel() * by_key[k].bits
               for n, k in assignment.items()) / total


def run_part(backend: str, seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(stage: str, done: int, total: int) -> None:
        if done in (0, total) or done % 8 == 0:
            print(f"[{backend}:{seed} {time.perf_counter() - start:7.1f}s] {stage} "
                  f"{done}/{total}", flush=True)

    budgets = [float(b) for b in args.budgets.split(",")]
    session = PTQSession("smollm2-135m", backend, DEFAULT_CANDIDATES, _settings(args, seed),
                         progress=log)
    t = time.perf_counter()
    session.prepare()
    prepare_s = time.perf_counter() - t
    t = time.perf_counter()
    session.value("calib")
    forward_s = time.perf_counter() - t
    rows: list[dict[str, Any]] = []
    methods = [m for m in args.methods.split(",") if m]
    for bits in budgets:
        budget = Budget.parse(f"avg_bits={bits:g}")
        resolved = session.resolve(budget)
        for name in [m for m in methods if m not in PEERS]:
            cap = MixedConfig(permutations=2, tolerance=None, min_permutations=2,
                              max_evaluations=len(session.groups) * (len(session.specs) - 1)
                              + 1, seed=seed)
            t = time.perf_counter()
            res = strategy.get(name, "transformer")(SearchProblem(
                session, session.cost, budget, session.specs, seed=seed, options={
                    "n_evaluations": args.evaluations, "resolved": resolved, "config": cap}))
            wall = time.perf_counter() - t
            assignment = session.assignment(tuple(res.detail.choice))
            cost = res.detail.cost
            rows.append({"backend": backend, "seed": seed, "avg_bits": bits, "method": name,
                         "seconds": wall, "evaluations": cost.get("evaluations"),
                         "forward_passes": cost.get("forward_passes"),
                         "backward_passes": cost.get("backward_passes"),
                         "fits": all(r["ok"] for r in budget.check(session.cost, res.policy)),
                         "bits": _bits(session, assignment), **_measure(session, assignment)})
            print(f"  {backend}:{seed} {bits} {name}: ppl {rows[-1]['test_perplexity']:.3f} "
                  f"in {wall:.1f}s", flush=True)
    as_cost: dict = {}
    if "autoscheme" in methods:
        from smpq.transformer.peers import autoscheme_allocation

        try:
            peer = [float(b) for b in (args.peer_budgets or args.budgets).split(",")]
            found, as_cost = autoscheme_allocation(session, peer)
        except Exception as e:  # a peer's failure is a result to report, not a crash
            import traceback

            traceback.print_exc()
            print(f"  autoscheme failed: {type(e).__name__}: {e}", flush=True)
            found, as_cost = {}, {"seconds": None, "error": f"{type(e).__name__}: {e}"}
        for bits, assignment in found.items():
            rows.append({"backend": backend, "seed": seed, "avg_bits": bits,
                         "method": "autoscheme", "seconds": as_cost["seconds"],
                         "seconds_note": "one scoring run for all budgets",
                         "evaluations": None, "fits": _bits(session, assignment) <= bits + 1e-9,
                         "bits": _bits(session, assignment), **_measure(session, assignment)})
            print(f"  {backend}:{seed} {bits} autoscheme: ppl "
                  f"{rows[-1]['test_perplexity']:.3f}", flush=True)
    part = {"backend": backend, "seed": seed, "autoscheme": as_cost or None,
            "float_test_perplexity": session.refs["test"].perplexity, "prepare_seconds": prepare_s,
            "forward_seconds": forward_s, "settings": vars(args) | {"part": None},
            "data": session.data_info, "rows": rows,
            "seconds": time.perf_counter() - start}
    PARTS.mkdir(parents=True, exist_ok=True)
    tag = f".{args.tag}" if args.tag else ""
    part["tag"] = args.tag
    atomic_write_text(PARTS / f"{backend}_seed{seed}{tag}.json",
                      json.dumps(part, indent=1) + "\n")
    return part


# ------------------------------------------------------------------------------ merge


def _by(rows: list[dict], *keys: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def summarize(parts: list[dict]) -> dict:
    rows = [r for p in parts for r in p["rows"]]
    table = []
    for (backend, bits, method), rs in sorted(_by(rows, "backend", "avg_bits", "method").items()):
        ppl = [r["test_perplexity"] for r in rs]
        secs = [r["seconds"] for r in rs if r["seconds"] is not None]
        table.append({"backend": backend, "avg_bits": bits, "method": method,
                      "seeds": len(rs), "ppl_mean": statistics.fmean(ppl),
                      "ppl_min": min(ppl), "ppl_max": max(ppl),
                      "seconds_mean": statistics.fmean(secs) if secs else None,
                      "all_fit": all(r["fits"] for r in rs)})
    # paired per (backend, seed, budget): ours vs the best other method
    ratios: dict[float, list[float]] = {}
    margins: dict[float, list[float]] = {}
    for (_backend, _seed, bits), rs in _by(rows, "backend", "seed", "avg_bits").items():
        ours = [r for r in rs if r["method"] == OURS]
        others = [r["test_perplexity"] for r in rs
                  if r["method"] != OURS and "@" not in r["method"] and r["fits"]]
        if not ours or not others:
            continue
        best = min(others)
        ratios.setdefault(bits, []).append(ours[0]["test_perplexity"] / best)
        margins.setdefault(bits, []).append(best - ours[0]["test_perplexity"])
    spread = {}
    for (backend, bits, method), rs in _by(rows, "backend", "avg_bits", "method").items():
        if len(rs) > 1:
            spread[f"{backend}/{bits:g}/{method}"] = max(r["test_perplexity"] for r in rs) - min(
                r["test_perplexity"] for r in rs)
    auto = [r["seconds"] for r in rows if r["method"] == "autoscheme" and r["seconds"]]
    ours_s = [r["seconds"] for r in rows if r["method"] == OURS]
    gguf = RESULTS / "llm_gguf.json"
    gguf_ratio = {}
    if gguf.is_file():
        gguf_ratio = json.loads(gguf.read_text()).get("summary", {}).get(
            "gguf_ppl_ratio_vs_llamacpp", {})
    summary = {
        "ppl_ratio_2p5_vs_best_other": statistics.fmean(ratios[2.5]) if 2.5 in ratios else None,
        "ppl_margin_3_min": min(margins[3.0]) if 3.0 in margins else None,
        "ppl_margin_3p5_min": min(margins[3.5]) if 3.5 in margins else None,
        "alloc_seconds_over_autoscheme": (max(ours_s) / statistics.fmean(auto)
                                          if auto and ours_s else None),
        "gguf_ppl_ratio_vs_llamacpp": gguf_ratio,
        "targets": {"ppl_ratio_2p5_vs_best_other": "<= 0.8",
                    "ppl_margin_3_min": "> seed spread", "ppl_margin_3p5_min": "> seed spread",
                    "alloc_seconds_over_autoscheme": "<= 3",
                    "gguf_ppl_ratio_vs_llamacpp": "< 1 at every size, <= 0.95 at the two "
                                                  "smaller"},
        "seed_spread_ours": {f"{b:g}": spread.get(f"rtn/{b:g}/{OURS}") for b in (2.5, 3.0, 3.5)},
        "ratio_per_seed": {f"{b:g}": v for b, v in sorted(ratios.items())},
        "margin_per_seed": {f"{b:g}": v for b, v in sorted(margins.items())},
    }
    return {"summary": summary, "table": table, "seed_spread": spread,
            "float_test_perplexity": {f"{p['backend']}:{p['seed']}": p["float_test_perplexity"]
                                      for p in parts},
            "parts": [{k: v for k, v in p.items() if k != "rows"} for p in parts],
            "rows": rows}


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["# Real LLM: SmolLM2-135M, weight-only int2/3/4/8 g32, allocators side by side",
             "", "Test perplexity on the Wikipedia test split (lower is better); every "
             "allocation re-quantized with the same backend. `seconds`: the allocation's wall "
             "time (AutoScheme: one scoring run for all three budgets).", "",
             "| summary | value | target |", "|---|---|---|"]
    for k, t in s["targets"].items():
        v = s.get(k)
        v = (f"{v:.4g}" if isinstance(v, float) else json.dumps(v)) if v is not None else "n/a"
        lines.append(f"| {k} | {v} | {t} |")
    lines += ["", "| backend | avg bits | method | seeds | ppl mean | ppl min–max | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in res["table"]:
        sec = f"{r['seconds_mean']:.0f}" if r["seconds_mean"] is not None else "n/a"
        fit = "" if r["all_fit"] else " (over budget)"
        lines.append(f"| {r['backend']} | {r['avg_bits']:g} | {r['method']}{fit} | {r['seeds']} "
                     f"| {r['ppl_mean']:.3f} | {r['ppl_min']:.3f}–{r['ppl_max']:.3f} | {sec} |")
    floats = ", ".join(f"{k} {v:.3f}" for k, v in res["float_test_perplexity"].items())
    lines += ["", f"Float test perplexity: {floats}.", "", "Notes:", ""] + [
        f"- {n}" for n in NOTES] + [""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in res["table"]})
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        rows = [r for r in res["table"] if r["backend"] == backend]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["avg_bits"], r["ppl_mean"]) for r in rows if r["method"] == method)
            style = dict(lw=2.5, color="k") if method == OURS else dict(lw=1, alpha=0.8)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method, **style)
        ax.set_yscale("log")
        ax.set_xlabel("average weight bits")
        ax.set_ylabel("test perplexity")
        ax.set_title(f"SmolLM2-135M, {backend}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retag(parts: list[dict]) -> list[dict]:
    """A tagged part (a rerun of some methods after a fix) replaces those methods' rows of the
    untagged part with the same backend and seed; the replaced rows stay, renamed
    "<method>@r1", so both are reported (and the old ones never count as
    'other')."""
    base = [p for p in parts if not p.get("tag")]
    for new in [p for p in parts if p.get("tag")]:
        methods = {r["method"] for r in new["rows"]}
        cells = {(r["method"], r["avg_bits"]) for r in new["rows"]}
        for p in base:
            if (p["backend"], p["seed"]) == (new["backend"], new["seed"]):
                for r in p["rows"]:
                    if (r["method"], r["avg_bits"]) in cells:
                        r["method"] = f"{r['method']}@r1"
                p["rows"] += new["rows"]
                p.setdefault("reruns", []).append({"tag": new["tag"], "methods": sorted(methods),
                                                   "seconds": new["seconds"]})
    return base


def merge() -> dict:
    parts = retag([json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))])
    if not parts:
        raise SystemExit("no parts in benchmarks/results/llm_real_parts; run --part first")
    res = summarize(parts)
    atomic_write_text(RESULTS / "llm_real.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(RESULTS / "llm_real.md", markdown(res))
    plot(res, RESULTS / "llm_real.png")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", help="BACKEND:SEED, e.g. rtn:0 (one process per part)")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--budgets", default="2.5,3,3.5")
    ap.add_argument("--methods", default=",".join((*SEARCHES, *CHEAP, *PEERS)))
    ap.add_argument("--evaluations", type=int, default=24)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--test-blocks", type=int, default=16)
    ap.add_argument("--cache", default=".cache/smpq")
    ap.add_argument("--peer-budgets", default="", help="AutoScheme's budgets (default: "
                    "--budgets)")
    ap.add_argument("--tag", default="", help="a rerun of some methods: its rows replace "
                    "theirs in the untagged part at --merge (the old ones stay, renamed)")
    args = ap.parse_args()
    if args.part:
        backend, _, seed = args.part.partition(":")
        run_part(backend, int(seed or 0), args)
    if args.merge:
        res = merge()
        print(json.dumps(res["summary"], indent=1))
    if not args.part and not args.merge:
        ap.error("give --part BACKEND:SEED and/or --merge")


if __name__ == "__main__":
    main()
