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

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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
from smpq.transformer.inputs import encode_pairs as _encode_pairs
from smpq.transformer.inputs import lm_blocks as _lm_blocks
from smpq.transformer.inputs import load_model as _load
from smpq.transformer.inputs import model_cost as _model_cost
from smpq.transformer.mixed import (
    DEFAULT_CANDIDATES,
    MixedConfig,
    ProgressiveGame,
    build_candidates,
    estimate_contributions,
    group_costs,
    parse_candidates,
    spec_key,
)
from smpq.transformer.scores import (
    METHODS,
    allowed_choices,
    baseline_scores,
    contrastive_loss,
    gradient_moments,
    lm_loss,
)

__all__ = ["ALL_METHODS", "DEFAULT_METHOD", "PTQSession", "RunSettings", "ptq_command", "run_ptq"]

log = logging.getLogger(__name__)

ALL_METHODS = strategy.names("transformer")  # registered in smpq.transformer.strategies
DEFAULT_METHOD = "shapley-loop"  # smpq.transformer.engine_strategy, registered first
STATS_BACKENDS = ("gptq", "awq_rtn", "awq_gptq")
# methods whose value evaluations go through an smpq.evaluator (ptq --workers/--ray-address)
SCALED_METHODS = ("shapley", "shapley_pairwise", "shapley_literal", "shapley-loop")
# Causal-LM text: "auto" = the Wikipedia excerpt for models with a subword tokenizer when
# gensim's test data is installed, else the stdlib split (byte-level models: always stdlib).
TEXT_SOURCES = ("auto", "wikipedia", "stdlib")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunSettings:
    """Data sizes and estimation settings, sized for 2 CPU cores: every Shapley evaluation is a
    forward pass over the calibration set (one thread: tiny LM ~0.05 s for 8 blocks of 128,
    MiniLM ~0.8 s for 32 texts of <= 64 tokens)."""

    block: int = 128
    calib_blocks: int = 16
    val_blocks: int = 32
    test_blocks: int = 64
    calib_pairs: int = 16
    val_pairs: int = 32
    test_pairs: int = 64
    max_length: int = 64
    batch_size: int = 8
    fuse: bool = True
    shapley: MixedConfig = field(default_factory=MixedConfig)
    cache_dir: str = ".cache/smpq"
    text: str = "auto"  # causal LMs: "auto", "wikipedia" or "stdlib" (see TEXT_SOURCES)
    calib_text: str | None = None  # a user's calibration file (plain text or JSONL)
    calib_tokens: int | None = None  # calibration size in tokens (default block*calib_blocks)
    calib_seed: int | None = None  # Wikipedia calibration: None = evenly spread blocks, else
    # distinct blocks drawn with this seed (benchmarks repeat over calibration seeds)

    def __post_init__(self) -> None:
        if self.text not in TEXT_SOURCES:
            raise SmpqError(f"unknown text source {self.text!r}; known: "
                            f"{', '.join(TEXT_SOURCES)}")
        tokens = self.calib_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                                   or tokens < self.block):
            raise SmpqError(f"--calib-tokens must be an integer >= one block ({self.block} "
                            f"tokens), got {tokens!r}")

    @property
    def n_calib_blocks(self) -> int:
        return self.calib_blocks if self.calib_tokens is None else self.calib_tokens // self.block


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _model_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter and buffer (names, shapes, raw bytes) of `model`."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class PTQSession:
    """One model, its data, references and candidate weights: score, allocate, evaluate.

    The benchmark drives it directly (many methods and budgets on one session); `run_ptq` is
    one method and one budget plus the files. `budget`, if given, is checked right after
    loading, before the data and references are built."""

    def __init__(self, model: str, backend: str = "rtn",
                 candidates: str | list = DEFAULT_CANDIDATES,
                 settings: RunSettings = RunSettings(), out: str | Path | None = None,
                 progress: Progress | None = None, budget: Budget | None = None,
                 scale: Any = None) -> None:
        from smpq.backends import BACKENDS
        from smpq.transformer.models import arch_of, share_groups

        if backend not in BACKENDS:
            raise SmpqError(f"unknown PTQ backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.settings, self.backend, self.out = settings, backend, Path(out) if out else None
        self.progress = progress or (lambda stage, done, total: None)
        self.specs = parse_candidates(candidates)
        # where the Shapley game's values run: None (here), an smpq.evaluator.EvaluatorConfig,
        # or a callable SessionTask -> Evaluator
        self.scale, self._candidate_arg = scale, candidates
        self.progress("load", 0, 1)
        self.model, self.tokenizer, self.kind = _load(model, settings.cache_dir)
        self.model_name, self.arch = model, arch_of(self.model)
        # GGUF candidates: the token embedding and the output layer are units too, as in a
        # GGUF file (Hugging Face causal LMs; a tied output layer is the embedding's unit)
        self.embeddings = (self.kind == "causal_lm" and all(s.is_block for s in self.specs)
                           and hasattr(self.model, "get_input_embeddings"))
        self.linears, self.cost = _model_cost(self.model, self.embeddings)
        self.groups = share_groups(list(self.linears), self.arch, settings.fuse)
        if not self.linears:
            raise SmpqError(f"model {model!r} has no linear layers smpq can quantize")
        # per group, the candidate indices its layers can store (GGUF block formats need
        # rows of whole blocks); strategies choose only among these, and only these are built
        self.allowed = allowed_choices(self.linears, self.groups, self.specs)
        if budget is not None:  # before the data and the float references (minutes on LLMs)
            self.resolve(budget)
        self.progress("data", 0, 1)
        self._data()
        self._stats: dict | None = None
        self.stats_seconds = 0.0
        self.candidates: Any = None
        self.candidate_cost: dict[str, Any] = {}
        self.swapper: Any = None

    def prepare(self) -> PTQSession:
        """Quantize (or load from the cache) every candidate weight; needed before scoring.

        `candidate_cost` reports it apart from any method's cost: seconds in all, of which
        `stats_seconds` is the calibration-statistics pass when the backend (GPTQ, AWQ) had
        to build a candidate; that pass is shared, and billed in full to every user."""
        from smpq.transformer.values import WeightSwapper

        if self.candidates is None:
            needs = self.backend in STATS_BACKENDS  # RTN reads no Hessians: none collected
            # a layer's statistics depend on the calibration data and every weight upstream
            context = f"{self.calib_digest}:{self.model_digest}" if needs else ""
            cache = Path(self.settings.cache_dir) / "candidates"  # shared, content-keyed
            had_stats = self._stats is not None
            per_layer = {n: ks for g, ks in zip(self.groups, self.allowed, strict=True)
                         for n in g}
            self.candidates = build_candidates(self.linears, self.specs, self.backend,
                                               self.stats if needs else None, cache, context,
                                               self.progress, per_layer)
            c = self.candidates
            own = c.seconds - (self.stats_seconds if self._stats is not None and not had_stats
                               else 0.0)  # a stats pass timed inside the build
            used = needs and c.built > 0
            self.candidate_cost = {"seconds": own + (self.stats_seconds if used else 0.0),
                                   "quantize_seconds": own, "built": c.built,
                                   "loaded": c.loaded, **(self._stats_cost() if used else {})}
            # read from the candidate cache while swapped in: n_candidates x model never in RAM
            self.swapper = WeightSwapper(self.model, self.candidates.loaders())
        return self

    def resolve(self, budget: Budget) -> ResolvedBudget:
        """The budget's limits, once per run; raises SmpqError if no policy over the
        candidates fits."""
        from smpq.spec import LayerChoice

        allowed = {n: [LayerChoice(self.specs[k], None) for k in ks]
                   for g, ks in zip(self.groups, self.allowed, strict=True) for n in g}
        return budget.resolve(self.cost, allowed)

    def check(self, budget: Budget) -> dict[str, float]:
        """Raise SmpqError if no policy over the candidates fits; returns the limits."""
        return self.resolve(budget).limits

    # -- data and values ----------------------------------------------------------------
    def _data(self) -> None:
        from smpq.transformer.data import docstring_pairs
        from smpq.transformer.refcache import encoder_references, lm_references

        s, m, bs = self.settings, self.model, self.settings.batch_size
        self.model_digest = _model_digest(m)  # keys the reference and statistics caches
        if self.kind == "causal_lm":
            blocks, self.data_info = _lm_blocks(self.tokenizer, s)
            self.calib = blocks["calibration"]
            self.calib_batches = list(self.calib.split(bs))
            self.grad_batches = list(self.calib.split(1))
            # cached with the candidates (smpq.transformer.refcache): a second run, whatever
            # its method or output folder, runs no float forward
            self.refs, self.references_computed = lm_references(
                m, {"calib": self.calib, "val": blocks["validation"], "test": blocks["test"]},
                bs, s.cache_dir, self.model_digest, self.progress)
            self.references_total = len(self.refs)
            self.test_blocks = blocks["test"]
            self.forward_fn = lambda model, b: model(input_ids=b, use_cache=False)
            self.loss_fn = lm_loss
            self.calib_digest = _digest(self.calib)
            return
        tasks = {k: docstring_pairs(split, n) for k, split, n in (
            ("calib", "calibration", s.calib_pairs), ("val", "validation", s.val_pairs),
            ("test", "test", s.test_pairs))}
        self.refs, self.retrieval, self.references_computed = encoder_references(
            m, self.tokenizer, tasks, s.max_length, s.cache_dir, self.model_digest,
            self.progress)
        self.references_total = len(self.refs) + 2  # + the test queries and documents
        self.calib_batches = list(self.refs["calib"].inputs.batches)
        self.grad_batches = _encode_pairs(self.tokenizer, tasks["calib"], bs, s.max_length)
        self.forward_fn = lambda model, b: model(**b)
        self.loss_fn = contrastive_loss
        self.calib_digest = hashlib.sha256("\0".join(tasks["calib"].texts).encode()).hexdigest()
        self.data_info = {"text": "stdlib docstring pairs", "calibration": "stdlib"}

    def value(self, split: str = "calib") -> float:
        """Higher is better: -KL(float || model) for LMs, -(1 - embedding cosine) encoders."""
        from smpq.transformer import values

        if self.kind == "causal_lm":
            return -values.kl_to_float(self.model, self.refs[split])
        return -(1.0 - values.embedding_cosine(self.model, self.refs[split]))

    def stats(self) -> dict:
        """Calibration Hessians and activation means (collected once, timed)."""
        if self._stats is None:
            from smpq.backends import collect_input_stats

            self.progress("stats", 0, 1)
            start = time.perf_counter()
            if self.swapper is not None:
                self.swapper.restore()
            self._stats = self._collect(collect_input_stats)
            self.stats_seconds = time.perf_counter() - start
        return self._stats

    def _stats_cost(self) -> dict[str, Any]:
        """The statistics pass as billed to one of its users: in full, marked shared (it
        runs once per session, whichever user comes first)."""
        return {"stats_seconds": self.stats_seconds, "stats": "shared"}

    def _collect(self, collect: Callable) -> dict:
        """Input statistics of the linear units; an embedding unit gets its calibration token
        frequencies ("token_freq") and, when tied, the output layer's input Hessian
        ("head_hessian"): together the Hessian of its two uses (smpq.transformer.scores)."""
        from torch import nn

        lin = [n for n, m in self.linears.items() if isinstance(m, nn.Linear)]
        embs = [n for n, m in self.linears.items() if isinstance(m, nn.Embedding)]
        head = self.model.get_output_embeddings() if embs else None
        names = {id(m): n for n, m in self.model.named_modules()}
        tied = (head is not None and head.weight is self.linears[embs[0]].weight
                and id(head) in names)
        stats = collect(self.model, lin + ([names[id(head)]] if tied else []),
                        self.calib_batches, self.forward_fn)
        for n in embs:
            vocab = self.linears[n].weight.shape[0]
            counts = torch.bincount(self.calib.flatten(), minlength=vocab).double()
            stats[n] = {"token_freq": counts / counts.sum(), "n_tokens": int(counts.sum())}
            if tied:
                stats[n]["head_hessian"] = stats.pop(names[id(head)])["hessian"]
        return stats

    # -- scores ---------------------------------------------------------------------------
    def game(self, ladder: bool = True) -> ProgressiveGame:
        def evaluate(levels: tuple[int, ...]) -> float:
            self.swapper.set(self.assignment(levels))
            return self.value("calib")

        return ProgressiveGame(len(self.groups), len(self.specs), evaluate, ladder,
                               batch=self.batch_evaluator())

    def batch_evaluator(self, split: str = "calib") -> Any:
        """The evaluator `scale` asks for, valuing group choices (candidate indices) on
        `split` as `value(split)` does (None: evaluate here, one by one)."""
        from smpq.evaluator import EvaluatorConfig, make_evaluator
        from smpq.transformer.tasks import SessionTask

        if self.scale is None or self.scale == EvaluatorConfig():
            return None
        task = SessionTask(self.model_name, str(self.out) if self.out else None, self.backend,
                           self._candidate_arg, self.settings, split, torch.get_num_threads())
        if isinstance(self.scale, EvaluatorConfig):
            return make_evaluator(task, self.scale)
        return self.scale(task)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.model_name, "weights": _digest(*[m.weight for m in
                                                              self.linears.values()]),
                "backend": self.backend, "candidates": list(self.candidates.keys),
                "groups": self.groups, "calibration": self.calib_digest}

    def shapley(self, config: MixedConfig, state_path: Path | None = None,
                resume: bool = False, ladder: bool = True
                ) -> tuple[ShapleyResult, ProgressiveGame, dict]:
        """Shapley values of the progressive game (mixed.py's docstring) and their cost."""
        game, start = self.game(ladder), time.perf_counter()
        try:
            result = estimate_contributions(game, config, state_path=state_path, resume=resume,
                                            fingerprint=self.fingerprint(),
                                            progress=self.progress)
        finally:
            self.swapper.restore()
            if game.batch is not None:
                game.batch.close()
        cost = {"seconds": time.perf_counter() - start, "forward_passes": game.forward_passes,
                "backward_passes": 0, "block_tokens": game.forward_passes * self._sweep(),
                "mask_evaluations": result.evaluations,
                "permutations": result.permutations, "stop_reason": result.stop_reason}
        return result, game, cost

    def baseline(self, method: str) -> tuple[tuple[np.ndarray, ...], dict, dict]:
        """(scores per group, raw per-layer errors, cost) of one baseline method."""
        if method not in METHODS:
            raise SmpqError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
        self.swapper.restore()
        extra, moments, n_grad, shared = 0.0, None, 0, {}
        stats = None
        if method in ("hessian", "relerr"):  # the shared stats pass, billed whoever ran it
            stats = self.stats()
            extra, shared = self.stats_seconds, self._stats_cost()
        if method in ("fisher", "gradxdw"):  # gradients: recomputed per method, its own
            start = time.perf_counter()
            moments, n_grad = gradient_moments(  # only the moment it reads (float32 copy)
                self.model, self.linears, self.grad_batches, self.loss_fn,
                keys=("grad_sq",) if method == "fisher" else ("grad",))
            extra = time.perf_counter() - start
        res = baseline_scores(method, self.linears, self.groups, self.candidates, stats=stats,
                              moments=moments, n_grad_batches=n_grad)
        # block-tokens: a backward counts as two forwards; the stats pass is one sweep
        grad = self._sweep(self.grad_batches) * 3 if method in ("fisher", "gradxdw") else 0
        if moments is not None:  # a float32 copy of the weights, freed: give it back
            from smpq.memory import release_free_memory

            del moments
            release_free_memory()
        cost = {"seconds": res.seconds + extra, "score_seconds": res.seconds,
                "forward_passes": res.forward_passes,
                "backward_passes": res.backward_passes,
                "block_tokens": grad or (self._sweep() if stats is not None else 0), **shared}
        return res.scores, res.errors, cost

    def _sweep(self, batches: Any = None) -> int:
        """Block-tokens of one forward over `batches` (default: the calibration batches)."""
        from smpq.transformer.prefix import batch_tokens, transformer_blocks

        batches = self.calib_batches if batches is None else batches
        return sum(batch_tokens(b) for b in batches) * transformer_blocks(self.model)

    # -- allocation and evaluation ---------------------------------------------------------
    def budget_costs(self, budget: Budget, resolved: ResolvedBudget | None = None
                     ) -> tuple[dict, dict[str, float], dict[str, float]]:
        """Per-group candidate costs, the unit limits and the tolerance scales: the
        allocation problem of `budget`, resolved once (pass `resolved` to reuse it)."""
        resolved = resolved or self.resolve(budget)
        return (group_costs(self.cost, self.groups, self.specs), resolved.unit_limits,
                resolved.scales)

    def allocate(self, method: str, scores: Any, budget: Budget,
                 result: ShapleyResult | None = None, config: MixedConfig = MixedConfig(),
                 resolved: ResolvedBudget | None = None) -> Allocation | tuple[int, ...]:
        """Allocate precomputed scores as the registered `method` does (nothing measured)."""
        problem = SearchProblem(self, self.cost, budget, self.specs, options={
            "scores": scores, "shapley_result": result, "config": config,
            "resolved": resolved})
        return strategy.get(method, "transformer")(problem).detail.allocation

    def evaluate(self, choice: tuple[int, ...], stage: str | None = None) -> dict[str, float]:
        """Validation (search objective) and test metrics of one group choice."""
        return self.evaluate_layers(self.assignment(choice), stage)

    def assignment(self, choice: tuple[int, ...]) -> dict[str, str]:
        """{layer: candidate key} of a group choice (every member of a group alike)."""
        keys = self.candidates.keys
        return {n: keys[k] for g, k in zip(self.groups, choice, strict=True) for n in g}

    def evaluate_layers(self, assignment: Mapping[str, str], stage: str | None = None
                        ) -> dict[str, float]:
        """`evaluate` for a per-layer assignment {layer: candidate key} (e.g. a peer's
        allocation that ignores the share groups). `stage`: report each forward to
        `progress` under that name (validation, then test: causal LMs read KL and
        perplexity off one test forward)."""
        from smpq.transformer import values

        tick = ((lambda done: self.progress(stage, done, 2)) if stage is not None
                else (lambda done: None))
        with self.swapper.applied(dict(assignment)):
            tick(0)
            out = {"val_value": self.value("val")}
            tick(1)
            if self.kind == "causal_lm":
                kl, nll = values.kl_and_nll(self.model, self.refs["test"])
                out["test_kl"], out["test_perplexity"] = kl, math.exp(nll)
            else:
                out["test_cosine"] = 1.0 + self.value("test")
                out.update(values.retrieval_report(self.model, self.retrieval, self._k))
            tick(2)
        return out

    def float_metrics(self) -> dict[str, float]:
        if self.kind == "causal_lm":
            return {"test_perplexity": self.refs["test"].perplexity}
        self.swapper.restore()
        from smpq.transformer import values

        return values.retrieval_report(self.model, self.retrieval, self._k)

    @property
    def _k(self) -> int:
        return min(10, self.retrieval.scores.shape[1])


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
