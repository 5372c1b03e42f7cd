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
from smpq.fileio import atomic_write_text, output_dir
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
            context = f"{self.calib_digest}:{_model_digest(self.model)}" if needs else ""
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
            self.swapper = WeightSwapper(self.model, self.candidates.weights)
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
        from smpq.transformer import values
        from smpq.transformer.data import docstring_pairs

        s, m, bs = self.settings, self.model, self.settings.batch_size
        if self.kind == "causal_lm":
            blocks, self.data_info = _lm_blocks(self.tokenizer, s)
            self.calib = blocks["calibration"]
            self.calib_batches = list(self.calib.split(bs))
            self.grad_batches = list(self.calib.split(1))
            self.refs = {}
            todo = (("calib", self.calib), ("val", blocks["validation"]), ("test", blocks["test"]))
            for i, (k, b) in enumerate(todo):  # weighted by tokens would be finer; 3 steps do
                self.progress("float references", i, len(todo))
                self.refs[k] = values.float_reference(m, b, batch_size=bs)
            self.progress("float references", len(todo), len(todo))
            self.test_blocks = blocks["test"]
            self.forward_fn = lambda model, b: model(input_ids=b, use_cache=False)
            self.loss_fn = lm_loss
            self.calib_digest = _digest(self.calib)
            return
        tasks = {k: docstring_pairs(split, n) for k, split, n in (
            ("calib", "calibration", s.calib_pairs), ("val", "validation", s.val_pairs),
            ("test", "test", s.test_pairs))}
        self.refs = {k: values.encoder_reference(m, self.tokenizer, t.texts, s.max_length)
                     for k, t in tasks.items()}
        self.retrieval = values.retrieval_reference(m, self.tokenizer, tasks["test"], s.max_length)
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
                               batch=self._batch_evaluator())

    def _batch_evaluator(self) -> Any:
        """The evaluator `scale` asks for (None: the game evaluates here, one by one)."""
        from smpq.evaluator import EvaluatorConfig, make_evaluator
        from smpq.transformer.tasks import SessionTask

        if self.scale is None or self.scale == EvaluatorConfig():
            return None
        task = SessionTask(self.model_name, str(self.out) if self.out else None, self.backend,
                           self._candidate_arg, self.settings, "calib", torch.get_num_threads())
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
                "backward_passes": 0, "mask_evaluations": result.evaluations,
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
            moments, n_grad = gradient_moments(self.model, self.linears, self.grad_batches,
                                               self.loss_fn)
            extra = time.perf_counter() - start
        res = baseline_scores(method, self.linears, self.groups, self.candidates, stats=stats,
                              moments=moments, n_grad_batches=n_grad)
        cost = {"seconds": res.seconds + extra, "score_seconds": res.seconds,
                "forward_passes": res.forward_passes,
                "backward_passes": res.backward_passes, **shared}
        return res.scores, res.errors, cost

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

    def evaluate(self, choice: tuple[int, ...]) -> dict[str, float]:
        """Validation (search objective) and test metrics of one group choice."""
        return self.evaluate_layers(self.assignment(choice))

    def assignment(self, choice: tuple[int, ...]) -> dict[str, str]:
        """{layer: candidate key} of a group choice (every member of a group alike)."""
        keys = self.candidates.keys
        return {n: keys[k] for g, k in zip(self.groups, choice, strict=True) for n in g}

    def evaluate_layers(self, assignment: Mapping[str, str]) -> dict[str, float]:
        """`evaluate` for a per-layer assignment {layer: candidate key} (e.g. a peer's
        allocation that ignores the share groups)."""
        from smpq.transformer import values

        with self.swapper.applied(dict(assignment)):
            out = {"val_value": self.value("val")}
            if self.kind == "causal_lm":
                out["test_kl"] = -self.value("test")
                out["test_perplexity"] = values.perplexity(self.model, self.test_blocks,
                                                           self.settings.batch_size)
            else:
                out["test_cosine"] = 1.0 + self.value("test")
                out.update(values.retrieval_report(self.model, self.retrieval, self._k))
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
ENGINE_STATE_FILES = tuple(f"engine_state{tag}{ext}" for tag in ("", "_val", "_neg_nll",
                                                                  "_val_neg_nll")
                           for ext in (".json", ".session.json"))


def run_ptq(model: str, budget: str | Budget, backend: str = "rtn",
            method: str = DEFAULT_METHOD, out: str | Path = "runs/ptq",
            candidates: str | list = DEFAULT_CANDIDATES, seed: int = 0, resume: bool = False,
            progress: Progress | None = None, settings: RunSettings = RunSettings(),
            options: Mapping[str, Any] | None = None, export: str | None = None) -> dict:
    """Allocate formats for `model` ("tiny-lm", "minilm" or a local HF folder) under
    `budget` (e.g. "avg_bits=3.5"), evaluate, write the files; returns the summary.

    `options`: extra strategy options (shapley-loop: n_evaluations, top_k, priors).
    `export="gguf"`: also quantize with llama.cpp (smpq.export.llamacpp), checked first."""
    find = strategy.get(method, "transformer")
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if export is not None:  # before the output folder is claimed: nothing written
        _check_export(export, model, candidates, settings.cache_dir)
    with output_dir(out, keep=("shapley_state.json", *ENGINE_STATE_FILES)) as stage:
        _check_budget_early(model, budget, candidates)
        return _run_ptq(model, budget, backend, method, Path(out), stage, candidates, seed,
                        resume, progress, settings, find, options, export)


def _run_ptq(model: str, budget: Budget, backend: str, method: str, out: Path, stage: Path,
             candidates: str | list, seed: int, resume: bool, progress: Progress | None,
             settings: RunSettings, find: Callable,
             options: Mapping[str, Any] | None = None, export: str | None = None) -> dict:
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
    session = PTQSession(model, backend, candidates, settings, out, progress, budget)
    resolved = session.resolve(budget)
    limits = resolved.limits
    session.prepare()
    session.progress("score", 0, 1)
    found = find(SearchProblem(session, session.cost, budget, session.specs, seed=seed, options={
        **dict(options or {}), "config": config, "state_path": out / "shapley_state.json",
        "resume": resume, "resolved": resolved, "out": out}))
    d = found.detail
    alloc, choice, scores, result, errors, score_cost = (
        d.allocation, d.choice, d.scores, d.shapley, d.errors, d.cost)
    policy = found.policy
    session.progress("evaluate", 0, 1)
    metrics = session.evaluate(choice)
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
        "binding": list(alloc.binding) if isinstance(alloc, Allocation) else [],
        "metrics": metrics, "float": session.float_metrics(), "search_cost": score_cost,
        "candidates_built": session.candidates.built,
        "candidates_loaded": session.candidates.loaded,
        "candidate_cost": session.candidate_cost, "checkpoint_note": note,
        "seconds": time.perf_counter() - start, "limits": limits, "data": session.data_info,
        "shapley": config.to_dict() if result is not None else None,
    }
    if gguf is not None:
        summary["gguf"] = gguf
    atomic_write_text(stage / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def ptq_command(model: str = "tiny-lm", budget: str = "avg_bits=3", backend: str = "rtn",
                method: str = DEFAULT_METHOD, out: str = "runs/ptq", resume: bool = False,
                seed: int = 0, candidates: str = DEFAULT_CANDIDATES,
                evaluations: int | None = None, top_k: int | None = None,
                value: str | None = None, value_split: str | None = None,
                calib_text: str | None = None, calib_tokens: int | None = None,
                cache_dir: str | None = None, progress: Progress | None = None,
                export: str | None = None) -> str:
    """`smpq ptq`: run_ptq with plain arguments; returns a short report for the terminal."""
    base = RunSettings()
    settings = replace(base, calib_text=calib_text, calib_tokens=calib_tokens,
                       cache_dir=cache_dir or base.cache_dir)
    options = {k: v for k, v in (("n_evaluations", evaluations), ("top_k", top_k),
                                 ("metric", value), ("value_split", value_split))
               if v is not None}
    s = run_ptq(model, budget, backend, method, out, candidates, seed, resume, progress,
                settings, options, export)
    m = s["metrics"]
    main = (f"test perplexity {m['test_perplexity']:.4f} (float {s['float']['test_perplexity']:.4f}"
            f"), test KL {m['test_kl']:.5f}" if s["kind"] == "causal_lm" else
            f"test cosine {m['test_cosine']:.5f}, retrieval spearman {m['spearman']:.4f}")
    cost = s["search_cost"]
    lines = [f"note: {s['data']['note']}"] if s["data"].get("note") else []
    return "\n".join([*lines,
        f"{s['method']} / {s['backend']} under {s['budget']}: {main}",
        f"text: {s['data']['text']} (calibration: {s['data']['calibration']})",
        "formats: " + ", ".join(f"{k} x{v}" for k, v in s["choice"].items()),
        f"binding: {', '.join(s['binding']) or 'none'}; search {cost['seconds']:.1f}"
        f" s, {cost['forward_passes']} forward passes"
        + (f" ({cost['evaluations']} policies evaluated)" if "evaluations" in cost else ""),
        f"wrote {Path(out) / 'policy.json'}, summary.json, contributions.json",
        *([_gguf_line(s["gguf"])] if "gguf" in s else [])])


def _gguf_line(gguf: dict) -> str:
    from smpq.export.llamacpp import gguf_report

    return gguf_report(gguf)
