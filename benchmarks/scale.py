"""Value evaluations across workers: local vs Ray actors, and a measured plan for 7B models.

For each model it builds one value task (`smpq.evaluator`), draws the same random rows for
every backend, and times B batches of b rows: evaluations per second, forward seconds per
evaluation, overhead per batch (wall minus forward time per worker), parallel efficiency,
and whether every backend gave bit-identical values. On the digits CNN it also runs the
default allocator (shapley-loop) on the local backend and on the largest Ray pool and checks
that the policy and the checkpoint agree. From those numbers it models a 7B LLM (docs/SCALE.md).

    python benchmarks/scale.py                                  # digits + tiny LM, 1 and 2 workers
    python benchmarks/scale.py --quick                          # a smoke run (small batches)
    python benchmarks/scale.py --device cuda --model smollm2-135m --workers 1 \
        --out benchmarks/results/scale_gpu                      # on a GPU machine

Writes <out>.json and <out>.md (default benchmarks/results/scale.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from smpq.evaluator import EvaluatorConfig, LocalEvaluator, RayEvaluator
from smpq.fileio import atomic_write_text

OUT = Path(__file__).parent / "results" / "scale"
CACHE = Path(".cache/smpq")


# -- tasks ----------------------------------------------------------------------------------

def digits_task(cache: Path, quick: bool):
    """The default CNN task: small_resnet on digits (cached float model), 2/3/4/8 bits."""
    from smpq.cnn.data import get_splits
    from smpq.cnn.pipeline import default_pinned
    from smpq.cnn.search.harness import SearchSpace
    from smpq.cnn.search.tasks import PolicyTask
    from smpq.cnn.train import TrainConfig, fp_checkpoint, load_checkpoint
    from smpq.cost import trace_costs
    from smpq.spec import act_spec, weight_spec

    ckpt = fp_checkpoint("digits", "small_resnet", TrainConfig(seed=0), cache)
    net, _ = load_checkpoint(ckpt)
    splits = get_splits("digits")
    cost = trace_costs(net, splits.val[0][0][None])
    bits = (2, 3, 4, 8)
    space = SearchSpace.build(cost, [weight_spec(b) for b in bits], [act_spec(b) for b in bits],
                              default_pinned(cost.names))
    task = PolicyTask(net.eval(), space, splits.train, splits.val, "neg_kl",
                      val_samples=120 if quick else None, threads=1)
    info = {"model": "small_resnet on digits", "units": len(space.names),
            "levels": space.n_pairs, "val_samples": task.val_samples or len(splits.val)}
    return task, space.n_pairs, len(space.names), info, (net, splits, cost)


def lm_task(name: str, cache: Path, quick: bool, device: str):
    """The tiny LM (its default shape, briefly trained unless cached) or SmolLM2-135M."""
    from smpq.transformer.run import RunSettings
    from smpq.transformer.tasks import SessionTask

    if name == "smollm2-135m":
        from smpq.transformer.smollm2 import smollm2_folder

        folder = str(smollm2_folder(cache))
    else:
        from smpq.transformer.data import stdlib_corpus
        from smpq.transformer.tiny_lm import TinyLMConfig, train_tiny_lm

        # timing depends on the shape, not on how long it trained
        cfg = TinyLMConfig(steps=40 if quick else 200)
        folder = str(train_tiny_lm(cfg, stdlib_corpus()["train"], cache))
    settings = RunSettings(calib_blocks=4 if quick else 16, cache_dir=str(cache))
    task = SessionTask(folder, out=str(cache / "scale" / name), settings=settings)
    session = task.session()  # quantizes and caches the candidates once, before the workers
    n_params = sum(p.numel() for p in session.model.parameters())
    tokens = int(session.calib.numel())
    info = {"model": name, "units": len(session.groups), "levels": len(session.specs),
            "parameters": n_params, "tokens_per_evaluation": tokens}
    del session
    return task, info["levels"], info["units"], info


# -- measurements ---------------------------------------------------------------------------

def _rows(levels: int, units: int, batches: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, levels, size=(size, units)) for _ in range(batches)]


def run_backend(label: str, make, batches: list[np.ndarray]) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    ev = make()
    if isinstance(ev, LocalEvaluator):
        ev(batches[0][:1])  # build the task (the warm-up row is not timed below)
        ev.memo.clear()
        ev.calls, ev.forward_seconds, ev.wall_seconds, ev.batches = 0, 0.0, 0.0, 0
    startup = time.perf_counter() - t0
    values = []
    try:
        for b in batches:
            values.append(ev(b))
    finally:
        ev.close()
    n = ev.calls
    busy = min(ev.workers, max(1, n // max(1, len(batches))))
    row = {"backend": label, "workers": ev.workers, "startup_s": startup,
           "evaluations": n, "batches": ev.batches, "wall_s": ev.wall_seconds,
           "forward_s": ev.forward_seconds,
           "forward_s_per_evaluation": ev.forward_seconds / n,
           "evaluations_per_s": n / ev.wall_seconds,
           "overhead_s_per_batch": max(0.0, ev.wall_seconds - ev.forward_seconds / busy)
           / ev.batches}
    return row, np.concatenate(values)


def measure(name: str, task, levels: int, units: int, workers: list[int], device: str,
            batches: int, size: int, seed: int) -> dict:
    rows = _rows(levels, units, batches, size, seed)
    out, ref = [], None
    local_row, ref = run_backend("local", lambda: LocalEvaluator(task, device=device), rows)
    out.append(local_row)
    identical = True
    for w in workers if _has_ray() else []:
        row, vals = run_backend(
            f"ray x{w}", lambda w=w: RayEvaluator(task, workers=w, device=device), rows)
        row["identical_to_local"] = bool(np.array_equal(vals, ref))
        identical &= row["identical_to_local"]
        out.append(row)
    base = {r["workers"]: r["evaluations_per_s"] for r in out if r["backend"] != "local"}
    for r in out:
        # the share of wall time the workers spent computing: the backend's own overhead,
        # apart from CPU contention (on a shared 2-core machine workers do not get a core each)
        r["scheduling_efficiency"] = r["forward_s"] / r["workers"] / r["wall_s"]
        r["speedup_vs_local"] = r["evaluations_per_s"] / local_row["evaluations_per_s"]
        r["efficiency_vs_local"] = r["speedup_vs_local"] / r["workers"]
        if 1 in base and r["backend"] != "local":
            r["efficiency_vs_1_worker"] = r["evaluations_per_s"] / (base[1] * r["workers"])
    return {"task": name, "rows": out, "identical_to_local": identical,
            "batch_size": size, "batches": batches}


def search_check(parts, workers: int, evaluations: int) -> dict:
    """shapley-loop on the local backend and on `workers` Ray actors: same policy and state."""
    import tempfile

    from smpq.cnn.pipeline import default_pinned
    from smpq.cnn.search import SearchConfig
    from smpq.compare import run_method
    from smpq.cost import Budget

    net, splits, cost = parts
    cfg = SearchConfig(seed=0)
    out, states = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, backend in (("local", EvaluatorConfig()),
                               ("ray", EvaluatorConfig(workers=workers))):
            t0 = time.perf_counter()
            res, _ = run_method("shapley-loop", net, splits, cost,
                                Budget.parse("bitops=uniform:3/3"), default_pinned(cost.names),
                                cfg, n_evaluations=evaluations, top_k=max(4, workers),
                                out=Path(tmp) / label, backend=backend)
            st = json.loads((Path(tmp) / label / "engine_state.json").read_text())
            st.pop("seconds")
            states[label] = st
            out[label] = {"seconds": time.perf_counter() - t0, "evaluations": res.evaluations,
                          "policy": res.policy.bits_table(), "best_value": res.info["best_value"]}
    same = out["local"]["policy"] == out["ray"]["policy"] and states["local"] == states["ray"]
    return {"method": "shapley-loop", "evaluations": evaluations, "workers": workers,
            "identical_to_local": bool(same),
            "seconds": {k: v["seconds"] for k, v in out.items()},
            "best_value": out["local"]["best_value"]}


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# -- the 7B model ---------------------------------------------------------------------------

SEVEN_B = {
    "parameters": 6.7e9,
    "units": 900,  # linear layers (the count; a Llama-2-7B has 224, fused 128 groups)
    "levels": 4,  # int2/3/4/8 group-32 candidates
    "tokens_per_evaluation": 2048,  # 16 calibration blocks of 128 tokens, the package default
    "gpu_tflops": 989.0,  # H100/H200 dense bf16 peak
    "mfu": 0.30,  # achieved fraction of peak for a batched 2k-token forward (assumed)
    "permutations": 8,  # the progressive game's min_permutations (antithetic, adaptive stop)
    "engine_evaluations_per_player": 1.0,
    "engine_round_driver_s": 60.0,  # surrogate fit + two top-K MILPs per round, each capped
    # by EngineConfig.time_limit (30 s): the worst case
}

SCENARIOS = {  # overrides of SEVEN_B
    "central": {},
    "llama-2-7b fused groups": {"units": 128},  # 32 blocks x (qkv, o, gate+up, down)
    "pessimistic": {"permutations": 32, "tokens_per_evaluation": 8192, "mfu": 0.15},
}


def model_7b(overhead_s: float, **overrides: float) -> dict:
    """Wall time of a full allocation of a 7B LLM on 1, 8, 64 GPUs (assumptions in SEVEN_B).

    Forward time per evaluation = 2 x parameters x tokens / (peak x MFU). The progressive game
    evaluates every permutation's masks as one batch (the driver draws them), so its batches
    are large; the engine's loop evaluates K = 8 x GPUs policies per round and pays the
    driver's fit + MILP each round. `overhead_s` is the measured per-batch overhead.
    """
    a = {**SEVEN_B, **overrides}
    t_eval = 2 * a["parameters"] * a["tokens_per_evaluation"] / (a["gpu_tflops"] * 1e12 * a["mfu"])
    players = a["units"] * (a["levels"] - 1)
    game_evals = a["permutations"] * players
    engine_evals = int(a["engine_evaluations_per_player"] * players)
    out = {"assumptions": a, "players": players, "forward_s_per_evaluation": t_eval,
           "game_evaluations": game_evals, "engine_evaluations": engine_evals, "gpus": {}}
    for g in (1, 8, 64):
        batch = players  # one permutation per batch
        per_batch = math.ceil(batch / g) * t_eval + overhead_s
        game_h = a["permutations"] * per_batch / 3600
        ideal = game_evals * t_eval / g / 3600
        k = 8 * g
        screen = 0.3 * engine_evals
        rounds = math.ceil((engine_evals - screen) / k)
        engine_h = (math.ceil(screen / g) * t_eval + overhead_s
                    + rounds * (math.ceil(k / g) * t_eval + overhead_s
                                + a["engine_round_driver_s"])) / 3600
        out["gpus"][str(g)] = {"game_hours": game_h, "game_efficiency": ideal / game_h,
                               "engine_hours": engine_h, "engine_top_k": k,
                               "engine_rounds": rounds}
    return out


# -- output ---------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = [f"# Value evaluations across workers ({result['device']})", "",
             f"{result['machine']} (1-min load average {result['load_average_1min']:.1f}"
             "); torch threads per process: 1. Batches of random policies/assignments, the same "
             "rows on every backend. speed-up and efficiency are against the local backend; "
             "busy share = forward seconds / workers / wall (the backend's own overhead, apart "
             "from CPU contention).", ""]
    for t in result["tasks"]:
        lines += [f"## {t['task']}", "", "```", json.dumps(t["info"]), "```", "",
                  "| backend | workers | startup s | evals | evals/s | fwd s/eval | "
                  "overhead s/batch | speed-up | efficiency | busy share | identical |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            lines.append(
                f"| {r['backend']} | {r['workers']} | {r['startup_s']:.1f} | {r['evaluations']} "
                f"| {r['evaluations_per_s']:.2f} | {r['forward_s_per_evaluation']:.4f} | "
                f"{r['overhead_s_per_batch']:.3f} | {r['speedup_vs_local']:.2f} | "
                f"{r['efficiency_vs_local']:.2f} | {r['scheduling_efficiency']:.2f} | "
                f"{r.get('identical_to_local', True)} |")
        lines.append("")
    if result.get("search"):
        s = result["search"]
        lines += ["## shapley-loop, local vs Ray", "",
                  f"{s['evaluations']} evaluations, {s['workers']} workers: identical policy "
                  f"and checkpoint: **{s['identical_to_local']}**; seconds "
                  f"{s['seconds']}", ""]
    m = result["model_7b"]
    lines += ["## Modelled: a 7B LLM", "",
              f"{m['players']} players, {m['forward_s_per_evaluation']:.3f} s per evaluation "
              f"(assumptions in the JSON and docs/SCALE.md)", "",
              "| GPUs | game hours | game efficiency | engine hours (K) |", "|---|---|---|---|"]
    for g, r in m["gpus"].items():
        lines.append(f"| {g} | {r['game_hours']:.2f} | {r['game_efficiency']:.2f} | "
                     f"{r['engine_hours']:.2f} ({r['engine_top_k']}) |")
    lines += ["", "| scenario | players | s/eval | evaluations | 1 GPU h | 8 GPUs h | 64 GPUs h |"
              " engine 8 GPUs h |", "|---|---|---|---|---|---|---|---|"]
    for name, sc in result.get("model_7b_scenarios", {}).items():
        g = sc["gpus"]
        lines.append(f"| {name} | {sc['players']} | {sc['forward_s_per_evaluation']:.3f} | "
                     f"{sc['game_evaluations']} | {g['1']['game_hours']:.2f} | "
                     f"{g['8']['game_hours']:.2f} | {g['64']['game_hours']:.3f} | "
                     f"{g['8']['engine_hours']:.2f} |")
    s = result["summary"]
    lines += ["", "## Summary", "", "```", json.dumps(s, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits,tiny-lm",
                    help="comma-separated: digits, tiny-lm, smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", default="1,2", help="Ray pool sizes to time")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--search-evaluations", type=int, default=60)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="small batches: a smoke run")
    ap.add_argument("--remodel", action="store_true",
                    help="only recompute the 7B model and summary from <out>.json")
    args = ap.parse_args(argv)
    if args.remodel:
        return finish(json.loads(args.out.with_suffix(".json").read_text()), args.out)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",") if w]
    if args.quick:
        args.batches, args.batch_size, args.search_evaluations = 2, 8, 16
    ray_started = 0.0
    if _has_ray() and workers:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        ray_started = time.perf_counter() - t0
    tasks, search = [], None
    for name in [m.strip() for m in args.model.split(",") if m.strip()]:
        if name == "digits":
            task, levels, units, info, parts = digits_task(args.cache, args.quick)
        else:
            task, levels, units, info = lm_task(name, args.cache, args.quick, args.device)
            parts = None
        t = measure(name, task, levels, units, workers, args.device, args.batches,
                    args.batch_size, seed=0)
        t["info"] = info
        if "parameters" in info:  # forward FLOPs ~ 2 x parameters x tokens
            fwd = t["rows"][0]["forward_s_per_evaluation"]
            t["info"]["achieved_tflops_local"] = (2 * info["parameters"]
                                                  * info["tokens_per_evaluation"] / fwd / 1e12)
        tasks.append(t)
        print(json.dumps(t["rows"], indent=1), file=sys.stderr)
        if parts is not None and workers and _has_ray() and args.device == "cpu":
            search = search_check(parts, max(workers), args.search_evaluations)
    result = {"device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "tasks": tasks, "search": search,
              "load_average_1min": os.getloadavg()[0], "ray": _has_ray(),
              "ray_start_s": ray_started}
    if _has_ray() and workers:
        import ray

        result["ray_version"] = ray.__version__
        ray.shutdown()
    return finish(result, args.out)


def finish(result: dict, out: Path) -> dict:
    """Add the 7B model and the summary to measured results; write <out>.json and .md."""
    tasks, search = result["tasks"], result.get("search")
    rays = [r for t in tasks for r in t["rows"] if r["backend"] != "local"]
    overhead = max((r["overhead_s_per_batch"] for r in rays), default=0.0)
    result["model_7b"] = m7 = model_7b(overhead)
    result["model_7b_scenarios"] = {k: model_7b(overhead, **v) for k, v in SCENARIOS.items()}
    two = [r["efficiency_vs_local"] for r in rays if r["workers"] == 2]
    sched = [r["scheduling_efficiency"] for r in rays if r["workers"] == 2]
    result["summary"] = summary = {
        "identical_to_local": bool(all(t["identical_to_local"] for t in tasks)
                                   and (search is None or search["identical_to_local"])),
        "efficiency_2_workers": min(two) if two else None,
        "scheduling_efficiency_2_workers": min(sched) if sched else None,
        "load_average_1min": result["load_average_1min"],
        "modelled_7b_hours_8_gpus": m7["gpus"]["8"]["game_hours"],
        "modelled_7b_engine_hours_8_gpus": m7["gpus"]["8"]["engine_hours"],
        "ray": result["ray"], "ray_start_s": result["ray_start_s"],
        "overhead_s_per_batch": overhead,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
