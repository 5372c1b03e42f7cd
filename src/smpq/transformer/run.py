"""End-to-end weight-only mixed-precision PTQ of a local transformer, resumable after a kill.

    load -> budget check -> data -> float references -> candidate weights (cached) ->
    allocation (shapley-loop by default; Shapley game or a baseline) -> evaluation -> files

Data protocol (fixed, disjoint by article or file, see smpq.transformer.wiki and .data):

| model     | calibration: scores, Hessians, values | validation: reported     | test: final |
|-----------|----------------------------------------|--------------------------|-------------|
| causal LM | calibration split (Wikipedia excerpt   | KL on the validation     | perplexity, |
|           | for subword tokenizers when gensim is  | split                    | KL          |
|           | installed, else the stdlib split), or  |                          |             |
|           | `calib_text` (a user's file)           |                          |             |
| encoder   | calib_pairs docstring pairs            | embedding cosine         | cosine,     |
|           |                                        |                          | retrieval   |

Byte-level models (the tiny LM) always read the stdlib split; `RunSettings.text` forces a
source. `calib_tokens` sets the calibration size (whole blocks of `block` tokens).

Files in `out`: policy.json, contributions.json (per player / per group; shapley-loop adds
its search log), summary.json, the packed checkpoint (model.safetensors + quant_meta.json,
`smpq.export.load_quantized(out, m)`; not for AWQ backends, whose channel scales would need
folding into the previous op), exports/ (llama.cpp, GPTQModel, torchao, HF),
engine_state.json (shapley-loop) and shapley_state.json (Shapley game).

Candidate weights live in ONE shared cache, `<RunSettings.cache_dir>/candidates/` (CLI
`--cache-dir`, default .cache/smpq), not in `out`: each file is named by its content key
(`smpq.transformer.scores.candidate_key`: the layer's float weight, the spec, the backend, and
for backends that read statistics the calibration digest and a digest of the whole model,
since a layer's inputs depend on every weight upstream), written aside and renamed, so any
run with any `out` reuses it and two runs filling one key at once leave one complete file.
`resume=True` also continues the search from its checkpoint (without it, the search starts
afresh). `run_ptq` claims `out` with `smpq.fileio.output_dir`: locked for the run, the final
files written aside and swapped in at the end; the search state stays in `out` for resuming.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpq import strategy
from smpq.alloc import Allocation
from smpq.cost import Budget, ResolvedBudget
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text, check_resumable, output_dir
from smpq.shapley import ShapleyResult
from smpq.strategy import SearchProblem
from smpq.transformer.inputs import check_budget_early as _check_budget_early
from smpq.transformer.mixed import (
    DEFAULT_CANDIDATES,
    group_costs,
    spec_key,
)
from smpq.transformer.session import (  # re-exported: the session is half of this job's API
    STATS_BACKENDS,
    TEXT_SOURCES,
    Progress,
    PTQSession,
    RunSettings,
)

__all__ = ["ALL_METHODS", "DEFAULT_METHOD", "STATS_BACKENDS", "TEXT_SOURCES", "PTQSession",
           "Progress", "RunSettings", "ptq_command", "run_ptq"]

log = logging.getLogger(__name__)

ALL_METHODS = strategy.names("transformer")  # registered in smpq.transformer.strategies
DEFAULT_METHOD = "shapley-loop"  # smpq.transformer.engine_strategy, registered first
# methods whose value evaluations go through an smpq.evaluator (ptq --workers/--ray-address)
SCALED_METHODS = ("shapley", "shapley_pairwise", "shapley_literal", "shapley-loop")


def _contributions(session: PTQSession, choice: tuple[int, ...], scores: Any,
                   result: ShapleyResult | None, errors: Mapping | None) -> dict:
    keys = session.candidates.keys
    groups = [{"layers": g, "chosen": keys[c], "scores": dict(zip(keys, map(_num, s),
                                                                   strict=True))}
              for g, c, s in zip(session.groups, choice, scores, strict=True)]
    out: dict[str, Any] = {"candidates": list(keys), "groups": groups}
    if result is not None:
        lv = len(keys) - 1
        out["players"] = [{
            "group": p // lv, "candidate": keys[p % lv + 1], "layers": session.groups[p // lv],
            "step": f"{keys[p % lv]}->{keys[p % lv + 1]}",
            "estimate": float(result.estimate[p]), "stderr": _num(result.stderr[p]),
            "ci95": [_num(result.ci_low[p]), _num(result.ci_high[p])],
            "samples": int(result.n_samples[p])} for p in range(len(result.estimate))]
        out["value_full"], out["value_empty"] = result.value_full, result.value_empty
    if errors:
        out["layer_errors"] = {n: dict(zip(keys, map(_num, e), strict=True))
                               for n, e in errors.items()}
    return out


def binding_limits(session: PTQSession, choice: tuple[int, ...], budget: Budget,
                   resolved: ResolvedBudget, per_layer: bool = False) -> list[str]:
    """The limits the final policy has used up, the same test for every method: a limit
    binds when no single share group (`per_layer`: layer, for a peer's per-layer `choice`)
    can move to a candidate that costs more under it without breaking it (MILP methods also
    report their own `allocator_binding`)."""
    from smpq.alloc.problem import fits

    groups, allowed = session.groups, session.allowed
    if per_layer:
        allowed = [a for g, a in zip(groups, allowed, strict=True) for _ in g]
        groups = [[n] for g in groups for n in g]
    costs = group_costs(session.cost, groups, session.specs)
    _, limits, scales = session.budget_costs(budget, resolved)
    out = []
    for m, limit in limits.items():
        rows = [np.asarray(r, float) for r in costs[m]]
        total = sum(r[c] for r, c in zip(rows, choice, strict=True))
        steps = [r[k] - r[c] for r, c, ks in zip(rows, choice, allowed, strict=True)
                 for k in ks if r[k] > r[c]]
        if steps and not fits(total + min(steps), float(limit), float(scales.get(m, 0.0))):
            out.append(m)
    return out


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _write_model(session: PTQSession, out: Path, policy: Any) -> str | None:
    """The packed checkpoint + exports; returns why it was skipped, if it was."""
    from smpq.export import GGUF_NAME_MAPS, QuantizedTensor, save_quantized, write_exports

    note = None
    if any(c is not None and c.weight is not None and c.weight.is_block
           for c in policy.layers.values()):
        note = "GGUF block formats are llama.cpp's to store (exports/); no packed checkpoint"
        policy.save(out / "policy.json")
    elif session.backend.startswith("awq"):
        note = "AWQ weights carry per-channel scales the packed format cannot hold"
        policy.save(out / "policy.json")
    else:
        qweights = {}
        if session.backend == "gptq":
            for name, choice in policy.layers.items():
                key = spec_key(choice.weight)
                ex = session.candidates.extras[name][key]
                qweights[name] = QuantizedTensor.from_fake(
                    session.candidates.weights[name][key], choice.weight, ex["scale"],
                    ex.get("zero_point"))
        session.swapper.restore()
        from smpq.memory import release_free_memory

        release_free_memory()  # the candidates just swapped out, before the packed copy
        save_quantized(out, session.model, policy, qweights)
    arch = {"llama": "llama", "bert": "bert"}.get(session.arch)
    if arch in GGUF_NAME_MAPS:
        write_exports(out / "exports", policy, arch)
    return note


def _check_export(export: str, model: str, candidates: str | list, cache_dir: str) -> None:
    if export != "gguf":
        raise SmpqError(f"unknown export {export!r}; known: gguf")
    from smpq.export.llamacpp import check_gguf_export

    check_gguf_export(model, candidates, cache_dir)


# the engine's checkpoints (one per value option), kept across the output swap for --resume
ENGINE_STATE_FILES = tuple(f"engine_{part}{tag}{ext}" for tag in ("", "_val", "_neg_nll",
                                                                   "_val_neg_nll")
                           for part, ext in (("state", ".json"), ("state", ".session.json"),
                                             ("guided", ".json")))  # the guided phase's


def resume_states(method: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The state files (in `out`) a killed run of `method` resumes from; none for methods
    that keep none (the baselines, random, local)."""
    o = dict(options or {})
    if method == DEFAULT_METHOD:  # one checkpoint per value option (engine_strategy)
        tag = "".join(f"_{x}" for x, default in ((o.get("value_split", "calib"), "calib"),
                                                 (o.get("metric", "neg_kl"), "neg_kl"))
                      if x != default)
        return (f"engine_state{tag}.json",)
    return ("shapley_state.json",) if method == "shapley" or method.startswith(
        "shapley_") else ()


def run_ptq(model: str, budget: str | Budget, backend: str = "rtn",
            method: str = DEFAULT_METHOD, out: str | Path = "runs/ptq",
            candidates: str | list = DEFAULT_CANDIDATES, seed: int = 0, resume: bool = False,
            progress: Progress | None = None, settings: RunSettings = RunSettings(),
            options: Mapping[str, Any] | None = None, export: str | None = None,
            scale: Any = None) -> dict:
    """Allocate formats for `model` ("tiny-lm", "minilm" or a local HF folder) under
    `budget` (e.g. "avg_bits=3.5"), evaluate, write the files; returns the summary.

    `options`: extra strategy options (shapley-loop: n_evaluations, top_k, priors).
    `export="gguf"`: also quantize with llama.cpp (smpq.export.llamacpp), checked first.
    `scale`: where value evaluations run (an `smpq.evaluator.EvaluatorConfig`); the Shapley
    game methods and shapley-loop (`SCALED_METHODS`) batch them out, others refuse it."""
    from smpq.transformer.peers import PEER_METHODS, autoscheme_strategy, check_autoscheme

    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if method in PEER_METHODS:  # another tool's allocator; its package checked before loading
        check_autoscheme(budget, candidates)
        find = autoscheme_strategy
    else:
        find = strategy.get(method, "transformer")
    check_scale(method, scale)
    if export is not None:  # before the output folder is claimed: nothing written
        _check_export(export, model, candidates, settings.cache_dir)
    if resume:
        check_resumable(method, out, resume_states(method, options))
    with output_dir(out, keep=("shapley_state.json", *ENGINE_STATE_FILES)) as stage:
        _check_budget_early(model, budget, candidates)
        return _run_ptq(model, budget, backend, method, Path(out), stage, candidates, seed,
                        resume, progress, settings, find, options, export, scale)


def check_scale(method: str, scale: Any) -> None:
    """One line for a method that cannot send its value evaluations elsewhere yet."""
    from smpq.evaluator import EvaluatorConfig

    if scale is None or scale == EvaluatorConfig() or method in SCALED_METHODS:
        return
    raise SmpqError(f"--workers/--ray-address apply to {', '.join(SCALED_METHODS)} (their "
                    f"batches of policies) for now; {method} evaluates in this process")


def _run_ptq(model: str, budget: Budget, backend: str, method: str, out: Path, stage: Path,
             candidates: str | list, seed: int, resume: bool, progress: Progress | None,
             settings: RunSettings, find: Callable,
             options: Mapping[str, Any] | None = None, export: str | None = None,
             scale: Any = None) -> dict:
    """run_ptq inside its claimed folder: caches and sampler state in `out`, files in
    `stage`."""
    config = replace(settings.shapley, seed=seed)
    start = time.perf_counter()
    if method == DEFAULT_METHOD:  # an impossible evaluation budget fails before any work
        from smpq.engine.loop import EngineConfig, min_evaluations

        o = dict(options or {})
        cfg = EngineConfig(evaluations=int(o.get("n_evaluations", strategy.MAX_EVALUATIONS)),
                           top_k=o.get("top_k", 4))
        need = min_evaluations(None, cfg)  # type: ignore[arg-type]  # needs no space yet
        from smpq.transformer.engine_strategy import METRICS, VALUE_SPLITS

        for key, known in (("metric", METRICS), ("value_split", VALUE_SPLITS)):
            if o.get(key, known[0]) not in known:
                raise SmpqError(f"unknown {key.replace('_', ' ')} {o[key]!r}; known: "
                                f"{', '.join(known)}")
        if cfg.evaluations < need:
            raise SmpqError(f"an evaluation budget of {cfg.evaluations} is below the {need} "
                            "one screening and one round need")
    if settings.calib_text is not None:
        from smpq.transformer.wiki import read_text_documents

        if not read_text_documents(settings.calib_text):  # missing or empty: before loading
            raise SmpqError(f"calibration text {settings.calib_text} is empty")
    session = PTQSession(model, backend, candidates, settings, out, progress, budget, scale)
    resolved = session.resolve(budget)
    limits = resolved.limits
    session.prepare()
    session.progress(method, 0, 1)  # the search or scoring, under its own name
    found = find(SearchProblem(session, session.cost, budget, session.specs, seed=seed, options={
        **dict(options or {}), "config": config, "state_path": out / "shapley_state.json",
        "resume": resume, "resolved": resolved, "out": out}))
    policy = found.policy
    if "assignment" in found.info:  # a peer's per-layer allocation (share groups ignored)
        return _finish_peer(session, found, model, budget, backend, method, stage, seed,
                            export, settings, start, resolved)
    d = found.detail
    alloc, choice, scores, result, errors, score_cost = (
        d.allocation, d.choice, d.scores, d.shapley, d.errors, d.cost)
    metrics = session.evaluate(choice, stage="evaluate")
    session.progress("write", 0, 1)
    note = _write_model(session, stage, policy)
    gguf = None
    if export == "gguf":
        from smpq.export.llamacpp import ptq_gguf_export

        gguf = ptq_gguf_export(model, policy, stage / "exports", session.data_info["text"],
                               settings.cache_dir, progress=session.progress)
    contrib = _contributions(session, choice, scores, result, errors)
    if "engine" in found.info:
        contrib["engine"] = found.info["engine"]
    atomic_write_text(stage / "contributions.json", json.dumps(contrib, indent=1) + "\n")
    summary = {
        "model": model, "kind": session.kind, "method": method, "backend": backend,
        "budget": str(budget), "seed": seed, "candidates": list(session.candidates.keys),
        "groups": len(session.groups), "layers": len(session.linears),
        "choice": {spec_key(session.specs[k]): int(sum(1 for c in choice if c == k))
                   for k in range(len(session.specs))},
        "budget_check": budget.check(session.cost, policy),
        "binding": binding_limits(session, choice, budget, resolved),
        "allocator_binding": list(alloc.binding) if isinstance(alloc, Allocation) else None,
        "metrics": metrics, "float": session.float_metrics(), "search_cost": score_cost,
        "block_tokens": score_cost.get("block_tokens"),  # the allocation's compute
        "candidates_built": session.candidates.built,
        "candidates_loaded": session.candidates.loaded,
        "candidate_cost": session.candidate_cost, "checkpoint_note": note,
        "references": {"computed": session.references_computed,
                       "cached": session.references_total - session.references_computed},
        "seconds": time.perf_counter() - start, "limits": limits, "data": session.data_info,
        # the float perplexity depends on the test text's size: reports state it
        "test_size": (list(session.test_blocks.shape) if session.kind == "causal_lm"
                      else None),  # [blocks, tokens per block]
        "shapley": config.to_dict() if result is not None else None,
        **_memory(session.model),
    }
    if gguf is not None:
        summary["gguf"] = gguf
    atomic_write_text(stage / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _finish_peer(session: PTQSession, found: Any, model: str, budget: Budget, backend: str,
                 method: str, stage: Path, seed: int, export: str | None,
                 settings: RunSettings, start: float, resolved: ResolvedBudget) -> dict:
    """`_run_ptq`'s end for a peer's per-layer allocation (`found.info["assignment"]`):
    evaluated and written as a shapley-loop result is, counted per layer."""
    assignment, policy = found.info["assignment"], found.policy
    keys = list(session.candidates.keys)
    metrics = session.evaluate_layers(assignment, stage="evaluate")
    session.progress("write", 0, 1)
    note = _write_model(session, stage, policy)
    if export == "gguf":
        raise SmpqError(f"--export gguf is not available with --method {method}")
    layers = [n for g in session.groups for n in g]
    choice = tuple(keys.index(assignment[n]) for n in layers)
    atomic_write_text(stage / "contributions.json", json.dumps(
        {"candidates": keys, "method": method, "layers": dict(assignment)}, indent=1) + "\n")
    summary = {
        "model": model, "kind": session.kind, "method": method, "backend": backend,
        "budget": str(budget), "seed": seed, "candidates": keys,
        "groups": len(session.groups), "layers": len(session.linears), "per_layer": True,
        "choice": {k: sum(1 for c in choice if keys[c] == k) for k in keys},
        "budget_check": budget.check(session.cost, policy),
        "binding": binding_limits(session, choice, budget, resolved, per_layer=True),
        "allocator_binding": None, "metrics": metrics, "float": session.float_metrics(),
        "search_cost": found.info["search_cost"],
        "candidates_built": session.candidates.built,
        "candidates_loaded": session.candidates.loaded,
        "candidate_cost": session.candidate_cost, "checkpoint_note": note,
        "references": {"computed": session.references_computed,
                       "cached": session.references_total - session.references_computed},
        "seconds": time.perf_counter() - start, "limits": resolved.limits,
        "data": session.data_info,
        "test_size": (list(session.test_blocks.shape) if session.kind == "causal_lm"
                      else None), "shapley": None}
    atomic_write_text(stage / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _memory(model: torch.nn.Module) -> dict[str, Any]:
    """Peak RSS of the process so far, the float parameters' bytes and their ratio."""
    from smpq.memory import model_bytes, peak_rss_bytes

    peak, size = peak_rss_bytes(), model_bytes(model)
    return {"peak_rss_bytes": peak, "model_bytes": size,
            "peak_rss_over_model": peak / size if size else None}


def ptq_command(model: str = "tiny-lm", budget: str = "avg_bits=3", backend: str = "rtn",
                method: str = DEFAULT_METHOD, out: str = "runs/ptq", resume: bool = False,
                seed: int = 0, candidates: str = DEFAULT_CANDIDATES,
                evaluations: int | None = None, top_k: int | None = None,
                value: str | None = None, value_split: str | None = None,
                calib_text: str | None = None, calib_tokens: int | None = None,
                cache_dir: str | None = None, progress: Progress | None = None,
                export: str | None = None, scale: Any = None) -> str:
    """`smpq ptq`: run_ptq with plain arguments; returns a short report for the terminal."""
    base = RunSettings()
    settings = replace(base, calib_text=calib_text, calib_tokens=calib_tokens,
                       cache_dir=cache_dir or base.cache_dir)
    options = {k: v for k, v in (("n_evaluations", evaluations), ("top_k", top_k),
                                 ("metric", value), ("value_split", value_split))
               if v is not None}
    s = run_ptq(model, budget, backend, method, out, candidates, seed, resume, progress,
                settings, options, export, scale)
    m = s["metrics"]
    size = "x".join(map(str, s.get("test_size") or ()))
    main = (f"test perplexity {m['test_perplexity']:.4f} (float {s['float']['test_perplexity']:.4f}"
            f"; test text {size} tokens), test KL {m['test_kl']:.5f}"
            if s["kind"] == "causal_lm" else
            f"test cosine {m['test_cosine']:.5f}, retrieval spearman {m['spearman']:.4f}")
    cost = s["search_cost"]
    lines = [f"note: {s['data']['note']}"] if s["data"].get("note") else []
    return "\n".join([*lines,
        f"{s['method']} / {s['backend']} under {s['budget']}: {main}",
        f"text: {s['data']['text']} (calibration: {s['data']['calibration']})",
        (f"formats of {s['layers']} layers (per layer, share groups not kept): "
         if s.get("per_layer") else
         f"formats of {s['groups']} share groups ({s['layers']} layers): ")
        + ", ".join(f"{k} x{v}" for k, v in s["choice"].items()),
        f"binding: {', '.join(s['binding']) or 'none'}; search {cost['seconds']:.1f}"
        f" s" + (f", {cost['forward_passes']} forward passes" if cost.get("forward_passes")
                 is not None else "")
        + (f" ({cost['evaluations']} policies evaluated)" if "evaluations" in cost else ""),
        f"wrote {Path(out) / 'policy.json'}, summary.json, contributions.json",
        *([_gguf_line(s["gguf"])] if "gguf" in s else [])])


def _gguf_line(gguf: dict) -> str:
    from smpq.export.llamacpp import gguf_report

    return gguf_report(gguf)
