"""The PTQ session: a local transformer, its text, float references and candidate weights,
prepared once and shared by every allocation method and the evaluation.

`RunSettings` (data sizes, estimation settings) and `PTQSession` (load -> data -> float
references -> candidate weights; values, scores, allocation and evaluation of group choices).
`smpq.transformer.run` is the job around it (output folder, resume, summary, files).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpq import strategy
from smpq.alloc import Allocation
from smpq.cost import Budget, ResolvedBudget
from smpq.errors import SmpqError
from smpq.shapley import ShapleyResult
from smpq.strategy import SearchProblem
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
)
from smpq.transformer.scores import (
    METHODS,
    allowed_choices,
    baseline_scores,
    contrastive_loss,
    gradient_moments,
    lm_loss,
)

__all__ = ["STATS_BACKENDS", "TEXT_SOURCES", "PTQSession", "Progress", "RunSettings"]

log = logging.getLogger(__name__)

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
            known = ", ".join(strategy.names("transformer"))
            raise SmpqError(f"unknown method {method!r}; known: {known}")
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


