"""The default transformer strategy, `shapley-loop`: the engine (`smpq.engine`) on share groups.

Units are the session's share groups (fused q/k/v and gate/up decide one format together);
each is a 1-D ladder of the candidate formats ordered by cost, cheapest first, holding only
the formats the group can store (`session.allowed`: GGUF K-quants need rows of whole
256-blocks), so ladders can differ in length between units (`unit_ladders`). A policy's
value is one weight swap (`WeightSwapper.set`, pointer swaps of cached candidates) and one
forward pass over the calibration blocks: -KL(float || quantized) for causal LMs, minus the
embedding cosine distance for encoders (`PTQSession.value`); the engine maximises
-log(distance), which orders policies alike and is closer to additive.

The cheap scores are priors twice over: the allocations of `priors` (Fisher and the best
uniform policy by default) are evaluated first, so the result is never worse than them by
this value, and the trust region of the loop starts around the best of them; and the scores
of `prior_feature` (Fisher by default) are a feature of the surrogate (`smpq.engine.model`):
with few evaluations the model is Fisher's additive prediction with a fitted scale, and the
measurements correct it step by step. Their scoring time counts in the reported cost.

Options (SearchProblem.options): n_evaluations (default DEFAULT_EVALUATIONS), top_k (4),
priors (names of registered transformer strategies), prior_feature (one name, or None),
value_split ("calib", the default, or
"val": the validation split, held out from what the priors' scores saw), metric ("neg_kl",
the default, or "neg_nll": minus the mean next-token NLL, closer to perplexity), screen_fraction
(0.3), patience (20),
resolved (the session's ResolvedBudget), out (folder for engine_state.json, and beside it
engine_state.session.json: the session's fingerprint and the priors, so a resume neither
scores them again nor continues on another model or text) and resume, progress (called
with (done, planned, best engine value) per engine batch; the session's progress hears of
every evaluation). `result.detail` is an `Allocated`
whose scores are the surrogate's ladder Shapley values summed up each ladder;
`result.info["engine"]` has the search log (value curve, rounds, R^2, interactions).

Causal LMs (and encoders with `guided=True`) then spend the rest of a block-token budget on
Shapley-guided evolution (`smpq.engine.guided`): options block_tokens (default n_evaluations
full forwards' worth), guided (true for causal LMs), engine_share (0.4: the engine's share of
the evaluations, at least one round's worth), screen_blocks (a quarter of the calibration
blocks), offspring (8), survivors (2); prefix_reuse / prefix_cache_mb as every SessionValue.
Its checkpoint is engine_guided.json beside engine_state.json. `cost["trace"]` holds
(block-tokens spent, best value, choice) each time a policy within the budget beat the best.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from smpq.engine.guided import GuidedConfig, GuidedResult, guided_search
from smpq.engine.loop import (
    STATE_MAX_BYTES,
    EngineConfig,
    EngineResult,
    min_evaluations,
    run_engine,
)
from smpq.engine.model import bootstrap_shapley, fit_model
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text, read_json
from smpq.strategy import SearchProblem, StrategyResult, register
from smpq.transformer.prefix import DEFAULT_CACHE_MB

__all__ = ["DEFAULT_EVALUATIONS", "DEFAULT_FEATURE", "DEFAULT_PRIORS", "METRICS", "NAME",
           "SessionValue", "VALUE_SPLITS", "block_token_cap", "ladder_order", "policy_space",
           "prefix_cache_bytes", "prior_gains", "shapley_loop", "unit_ladders", "value_options"]

NAME = "shapley-loop"
# One evaluation is one forward over the calibration text: on SmolLM2-135M with 2,048 tokens
# about 8-10 s on a loaded 2-core machine (benchmarks/results/llm_real_smoke.md), so 24
# evaluations (priors included) take 3-4 minutes there, and seconds on small models.
DEFAULT_EVALUATIONS = 24
DEFAULT_PRIORS = ("fisher", "uniform")
DEFAULT_FEATURE = "fisher"  # whose scores are the surrogate's prior feature (None: none)
VALUE_SPLITS = ("calib", "val")  # the calibration blocks (default) or the validation split
METRICS = ("neg_kl", "neg_nll")  # engine value: -log KL to float, or -NLL (causal LMs)
ENGINE_SHARE = 0.4  # of the budget, in full-evaluation equivalents, before guided evolution
GUIDED_TOP_K = 2  # the engine's picks per round when guided evolution follows: fewer rounds
# of surrogate picks, more of measured moves


def ladder_order(costs: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Candidate indices from cheapest to richest (stable), by the summed size of all groups
    (avg_bits when size is absent); a ladder must climb in cost."""
    metric = "size" if "size" in costs else next(iter(costs))
    total = np.sum([np.asarray(r, float) for r in costs[metric]], axis=0)
    return np.argsort(total, kind="stable")


def unit_ladders(session: Any, order: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per unit, level -> candidate index: the global cost `order` restricted to the
    candidates the group can store (all of them, for a session without `allowed`)."""
    allowed = getattr(session, "allowed", None)
    if allowed is None:
        return (np.asarray(order),) * len(session.groups)
    return tuple(np.array([int(c) for c in order if int(c) in set(a)], dtype=np.int64)
                 for a in allowed)


def policy_space(session: Any, budget: Any, resolved: Any) -> tuple[PolicySpace, np.ndarray]:
    """(the engine's view of the session under `budget`, the global ladder order: candidate
    indices from cheapest to richest; `unit_ladders` gives each unit's level -> candidate).

    Costs come from `session.budget_costs` (one resolution: unit limits bound the groups'
    sum); the space holds full-total limits, with offset = full limit - unit limit."""
    costs, unit_limits, _ = session.budget_costs(budget, resolved)
    order = ladder_order(costs)
    ladders = unit_ladders(session, order)
    full = {m: float(v) for m, v in resolved.limits.items()}
    offsets = {m: full[m] - float(unit_limits[m]) for m in full}
    names = tuple(g[0] if len(g) == 1 else f"{g[0]}+{len(g) - 1}" for g in session.groups)
    per_unit = {m: tuple(np.asarray(r, float)[lad] for r, lad in zip(rows, ladders, strict=True))
                for m, rows in costs.items()}
    grid = tuple((len(lad),) for lad in ladders)
    return PolicySpace(names, grid, per_unit, offsets, full, ("w",)), order


def _priors(p: SearchProblem, resolved: Any
            ) -> tuple[list[tuple[str, tuple[int, ...]]], dict, dict[str, list]]:
    """(name, candidate choice) of every prior strategy, their summed scoring cost, and
    their per-group candidate scores (for the surrogate's prior feature)."""
    from smpq import strategy

    out, scores = [], {}
    cost = {"seconds": 0.0, "forward_passes": 0, "backward_passes": 0, "block_tokens": 0}
    for name in _prior_names(p):
        if name == NAME:
            raise SmpqError(f"{NAME} cannot be its own prior")
        opts = {k: v for k, v in p.options.items() if k in ("config",)} | {"resolved": resolved}
        res = strategy.get(name, "transformer")(SearchProblem(
            p.model, p.cost, p.budget, p.w_specs, seed=p.seed, options=opts))
        out.append((name, tuple(int(c) for c in res.detail.choice)))
        scores[name] = [np.asarray(r, float).tolist() for r in res.detail.scores]
        for k in cost:
            cost[k] += res.detail.cost.get(k, 0)
    return out, cost, scores


def _prior_names(p: SearchProblem) -> list[str]:
    """The prior strategies, the feature's source included (scored once either way)."""
    names = list(p.options.get("priors", DEFAULT_PRIORS))
    feature = p.options.get("prior_feature", DEFAULT_FEATURE)
    return names + [feature] if feature and feature not in names else names


def _session_priors(p: SearchProblem, resolved: Any, ckpt: Path | None, resume: bool
                    ) -> tuple[list[tuple[str, tuple[int, ...]]], dict, dict[str, list]]:
    """The priors, computed or (on resume) read back; with a checkpoint, what the session is
    (model weights, calibration text, candidates: `PTQSession.fingerprint`) is saved beside
    it, and a resume on another session is refused (the engine's own fingerprint covers the
    space and settings, not the data its values came from)."""
    names = _prior_names(p)
    if ckpt is None:
        return _priors(p, resolved)
    side = ckpt.with_suffix(".session.json")
    session = json.loads(json.dumps(p.model.fingerprint(), default=str))
    if resume and (ckpt.is_file() or side.is_file()):
        try:
            saved = read_json(side, "search session", STATE_MAX_BYTES)
        except (OSError, ValueError):
            saved = None
        same = isinstance(saved, dict) and saved.get("session") == session
        if not same and ckpt.is_file():
            raise SmpqError(f"the checkpoint {ckpt} belongs to another model, calibration text "
                            "or candidate set; use a fresh --out or drop --resume")
        if same and saved.get("prior_names") == names and "prior_scores" in saved:
            return ([(n, tuple(c)) for n, c in saved["priors"]], saved["prior_cost"],
                    saved["prior_scores"])
    priors, cost, scores = _priors(p, resolved)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(side, json.dumps({"session": session, "prior_names": names,
                                        "priors": [[n, list(c)] for n, c in priors],
                                        "prior_cost": cost, "prior_scores": scores}) + "\n")
    return priors, cost, scores


def prior_gains(space: PolicySpace, ladders: tuple[np.ndarray, ...], scores: list
                ) -> np.ndarray:
    """Per engine step (`space.players` order): the score gain of climbing that ladder step,
    score[g][lad[k]] - score[g][lad[k - 1]] with lad = `ladders[g]` (level -> candidate) and
    scores per group, per candidate."""
    rows = [np.asarray(r, float) for r in scores]
    return np.array([rows[u][ladders[u][k]] - rows[u][ladders[u][k - 1]]
                     for u, _, k in space.players])


class SessionValue:
    """The engine's value of a batch of ladder choices, with the forward passes timed and
    their compute counted in block-tokens (tokens x transformer blocks run).

    Causal LMs evaluate through `smpq.transformer.prefix.PrefixForward`: a policy starts
    its forward at the first block whose upstream weights differ from every cached policy's
    (the same numbers as a full forward; `cache_bytes` = 0 turns it off). `n_blocks` is the
    fidelity: the value on the first n token blocks of the split (None: all of them), the
    same KL (or NLL) definition; encoders: the first n text batches, full forwards."""

    def __init__(self, session: Any, ladders: tuple[np.ndarray, ...], split: str = "calib",
                 metric: str = "neg_kl", planned: int = 0, name: str = NAME,
                 cache_bytes: int = DEFAULT_CACHE_MB << 20):
        from smpq.transformer.prefix import PrefixForward, transformer_blocks

        self.s, self.ladders, self.split, self.metric = session, ladders, split, metric
        self.planned, self.name = planned, name  # name: the progress stage (the strategy's)
        self.keys = session.candidates.keys
        self.calls, self.seconds, self.pending = 0, 0.0, 0
        self.block_tokens, self.block_tokens_saved = 0, 0
        self.n_layers = transformer_blocks(session.model)
        self.lm = session.kind == "causal_lm"
        self.runner = (PrefixForward(session.model, session.swapper.layers, cache_bytes)
                       if self.lm else None)
        self.seen: dict[tuple[int, ...], float] = {}  # ladder choice -> engine value (full)
        self._refs: dict[int | None, Any] = {}  # encoders: reference per fidelity
        # (block-tokens spent, value, candidate choice) each time a full-fidelity value beat
        # the best so far: quality against compute
        self.trace: list[tuple[int, float, tuple[int, ...]]] = []
        self.fits: Any = None  # the policy space's `fits`: only policies in budget are traced
        self.pool: Any = None  # an smpq.evaluator for full-fidelity batches (ptq --workers)

    def assignment(self, levels: np.ndarray) -> dict[str, str]:
        return {n: self.keys[lad[k]] for g, lad, k in zip(self.s.groups, self.ladders, levels,
                                                          strict=True) for n in g}

    def _n(self, n_blocks: int | None) -> int | None:
        """The checked fidelity (None: the whole split). LMs: token blocks; encoders: text
        batches."""
        if n_blocks is None:
            return None
        ref = self.s.refs[self.split]
        total = len(ref.blocks) if self.lm else len(ref.inputs.batches)
        if (isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer))
                or n_blocks < 1 or n_blocks > total):
            raise SmpqError(f"n_blocks must be an integer in [1, {total}], got {n_blocks!r}")
        return None if int(n_blocks) == total else int(n_blocks)

    def _encoder_ref(self, n: int | None) -> Any:
        """The encoder's reference cut to its first n text batches (cached)."""
        if n not in self._refs:
            self._refs[n] = _prefix_ref(self.s.refs[self.split], n)
        return self._refs[n]

    def full_block_tokens(self, n_blocks: int | None = None) -> int:
        """The price in block-tokens of one full forward at that fidelity."""
        n = self._n(n_blocks)
        if self.lm:
            blocks = self.s.refs[self.split].blocks
            return int(blocks[:n].numel() if n is not None else blocks.numel()) * self.n_layers
        return sum(int(b["input_ids"].numel()) for b in self._encoder_ref(n).inputs.batches
                   ) * self.n_layers

    def raw(self, levels: np.ndarray, n_blocks: int | None = None) -> float:
        """The value of one ladder choice on the split: the session's (-KL, or -(1 - cosine)
        for encoders) or, with neg_nll, minus the mean next-token NLL."""
        from smpq.transformer.prefix import split_value

        assignment = self.assignment(levels)
        self.s.swapper.set(assignment)
        start = time.perf_counter()
        if self.lm:
            v, spent, saved = split_value(self.runner, self.s.refs[self.split], self.split,
                                          assignment, n_blocks, self.metric)
        elif n_blocks is None:
            v, spent, saved = float(self.s.value(self.split)), self.full_block_tokens(), 0
        else:  # an encoder on its first n text batches
            from smpq.transformer.values import embedding_cosine

            ref = self._encoder_ref(n_blocks)
            v = -(1.0 - embedding_cosine(self.s.model, ref))
            spent, saved = self.full_block_tokens(n_blocks), 0
        self.seconds += time.perf_counter() - start
        self.block_tokens += spent
        self.block_tokens_saved += saved
        self.calls += 1
        self.pending += 1
        # per evaluation (the engine reports per batch, and a screening batch takes minutes)
        self.s.progress(self.name, min(len(self.seen) + self.pending, self.planned),
                        self.planned)
        return v

    def _pooled(self, choices: np.ndarray) -> list[float]:
        """Full-fidelity values of a batch from `pool` (workers run full forwards of the
        session's own value), counted and timed as here."""
        rows = np.array([[int(lad[k]) for lad, k in zip(self.ladders, c, strict=True)]
                         for c in choices], dtype=np.int64)
        start = time.perf_counter()
        raw = [float(v) for v in self.pool.evaluate(rows)]
        self.seconds += time.perf_counter() - start
        self.calls += len(raw)
        self.block_tokens += len(raw) * self.full_block_tokens()
        self.s.progress(self.name, min(len(self.seen) + len(raw), self.planned), self.planned)
        return raw

    def __call__(self, choices: np.ndarray, n_blocks: int | None = None) -> np.ndarray:
        """Engine values (higher is better) of ladder choices, on the first `n_blocks`
        token blocks of the split (None: all). Only full-fidelity values enter `seen`.
        With a `pool` (an smpq.evaluator), full-fidelity batches of two or more go to it."""
        n = self._n(n_blocks)
        self.pending = 0
        if self.pool is not None and n is None and len(choices) > 1:
            raw = self._pooled(choices)
            spent = [self.block_tokens] * len(raw)  # one batch, valued at once
        else:
            raw, spent = [], []
            for c in choices:
                raw.append(self.raw(c, n))
                spent.append(self.block_tokens)  # after this evaluation
        out = np.array(raw if self.metric == "neg_nll" else
                       [-math.log(max(-v, 0.0) + 1e-9) for v in raw])
        self.pending = 0
        if n is None:
            self.seen.update({tuple(int(x) for x in c): float(v)
                              for c, v in zip(choices, out, strict=True)})
            ok = self.fits(choices) if self.fits is not None else [True] * len(out)
            for c, v, f, b in zip(choices, out, ok, spent, strict=True):  # best vs compute
                if f and (not self.trace or v > self.trace[-1][1]):
                    self.trace.append((b, float(v), tuple(
                        int(lad[k]) for lad, k in zip(self.ladders, c, strict=True))))
        return out

    def cost(self) -> dict[str, Any]:
        """The block-tokens of this value's evaluations, for a strategy's cost dict
        (`block_tokens` is the strategy's total: it adds its scores' to it;
        prefix_reuse_saving = the fraction of the evaluations' full price reuse saved)."""
        spent, saved = self.block_tokens, self.block_tokens_saved
        return {"block_tokens": spent, "evaluation_block_tokens": spent,
                "block_tokens_saved": saved,
                "prefix_reuse_saving": saved / (spent + saved) if spent + saved else 0.0,
                "prefix_reuse": bool(self.runner is not None and self.runner.supported
                                     and self.runner.cache.max_bytes > 0)}

    def load(self, checkpoint: Path | None) -> None:
        """Values a resumed search evaluated before the kill (for the log only)."""
        if checkpoint is None or not checkpoint.is_file():
            return
        try:
            st = read_json(checkpoint, "search state", STATE_MAX_BYTES)
            self.seen.update({tuple(c): float(v) for c, v in zip(st["choices"], st["values"],
                                                                 strict=True)})
        except (OSError, ValueError, KeyError, TypeError):
            return  # run_engine reports an unreadable checkpoint


def _prefix_ref(ref: Any, n_blocks: int | None) -> Any:
    """A float reference cut to its first `n_blocks` blocks (LMs: token blocks; encoders:
    text batches); None, or more than there are, = the whole reference."""
    from dataclasses import replace

    from smpq.transformer.values import EncodedTexts, FloatReference

    if n_blocks is None:
        return ref
    if int(n_blocks) < 1:
        raise SmpqError(f"n_blocks must be >= 1, got {n_blocks}")
    if isinstance(ref, FloatReference):
        if n_blocks >= len(ref.blocks):
            return ref
        return replace(ref, blocks=ref.blocks[:n_blocks], logp=ref.logp[:n_blocks],
                       index=None if ref.index is None else ref.index[:n_blocks])
    batches = ref.inputs.batches
    if n_blocks >= len(batches):
        return ref
    m = sum(len(b["input_ids"]) for b in batches[:n_blocks])
    rows = ref.inputs.order[:m]  # original text index of each kept row, in batch order
    import torch

    enc = EncodedTexts(batches=batches[:n_blocks], order=torch.arange(m), n=m)
    return replace(ref, inputs=enc, embeddings=ref.embeddings[rows])


def prefix_cache_bytes(p: SearchProblem, name: str) -> int:
    """The prefix-reuse cache size in bytes the options ask for (0: reuse off), checked:
    `prefix_reuse` (true, the default, or false) and `prefix_cache_mb` (>= 0, default
    DEFAULT_CACHE_MB)."""
    on = p.options.get("prefix_reuse", True)
    if not isinstance(on, bool):
        raise SmpqError(f"prefix_reuse of {name} must be true or false, got {on!r}")
    mb = p.options.get("prefix_cache_mb", DEFAULT_CACHE_MB)
    if (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb)
            or mb < 0):
        raise SmpqError(f"prefix_cache_mb of {name} must be a number >= 0, got {mb!r}")
    return int(mb * (1 << 20)) if on else 0


def block_token_cap(p: SearchProblem, value: SessionValue, n: int, name: str) -> int:
    """The search's compute budget in block-tokens: the `block_tokens` option, else `n`
    full evaluations' worth. A search starts an evaluation while it has spent less."""
    cap = p.options.get("block_tokens", n * value.full_block_tokens())
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise SmpqError(f"block_tokens of {name} must be a positive integer, got {cap!r}")
    return int(cap)


def value_options(p: SearchProblem, name: str) -> tuple[str, str]:
    """(value split, value metric) of the options, checked: one check for every strategy
    that evaluates whole policies with `SessionValue`."""
    split, metric = p.options.get("value_split", "calib"), p.options.get("metric", "neg_kl")
    if split not in VALUE_SPLITS:
        raise SmpqError(f"unknown value split {split!r} for {name}; known: "
                        f"{', '.join(VALUE_SPLITS)}")
    if metric not in METRICS:
        raise SmpqError(f"unknown value metric {metric!r} for {name}; known: "
                        f"{', '.join(METRICS)}")
    if metric == "neg_nll" and p.model.kind != "causal_lm":
        raise SmpqError(f"the neg_nll value of {name} needs a causal LM")
    return split, metric


@register(NAME, kind="transformer")
def shapley_loop(p: SearchProblem) -> StrategyResult:
    from smpq.transformer.mixed import choice_policy, spec_key
    from smpq.transformer.strategies import Allocated

    if p.budget is None:
        raise SmpqError(f"{NAME} needs a budget")
    s, o = p.model, p.options
    start = time.perf_counter()
    resolved = o.get("resolved") or s.resolve(p.budget)
    space, order = policy_space(s, p.budget, resolved)
    ladders = unit_ladders(s, order)
    cfg = EngineConfig(evaluations=int(o.get("n_evaluations", DEFAULT_EVALUATIONS)),
                       top_k=o.get("top_k", GUIDED_TOP_K if o.get("guided", s.kind ==
                                                                 "causal_lm") else 4),
                       seed=p.seed,
                       screen_fraction=float(o.get("screen_fraction", 0.3)),
                       patience=int(o.get("patience", 20)))
    split, metric = value_options(p, NAME)
    cache_bytes = prefix_cache_bytes(p, NAME)
    space.check_feasible()
    need = min_evaluations(space, cfg)
    if cfg.evaluations < need:  # before the priors spend anything
        raise SmpqError(f"an evaluation budget of {cfg.evaluations} is below the {need} one "
                        f"screening and one round need")
    out = o.get("out")
    tag = "".join(f"_{x}" for x, default in ((split, "calib"), (metric, "neg_kl"))
                  if x != default)
    ckpt = Path(out) / f"engine_state{tag}.json" if out is not None else None  # per value
    resume = bool(o.get("resume", False))
    value = SessionValue(s, ladders, split, metric, cfg.evaluations, cache_bytes=cache_bytes)
    value.fits = space.fits
    guided, engine_evals, budget_tokens = _guided_options(p, value, cfg, need)
    from smpq.evaluator import EvaluatorConfig

    if metric != "neg_kl" and getattr(s, "scale", None) not in (None, EvaluatorConfig()):
        raise SmpqError(f"{NAME} sends only the neg_kl value to workers; drop --workers/"
                        "--ray-address or the neg_nll value")
    prior_start = time.perf_counter()
    priors, prior_cost, prior_scores = _session_priors(p, resolved, ckpt, resume)
    prior_wall = time.perf_counter() - prior_start  # replaced by what the priors report
    feature = o.get("prior_feature", DEFAULT_FEATURE)
    gains = prior_gains(space, ladders, prior_scores[feature]) if feature else None
    if gains is not None and not np.all(np.isfinite(gains)):
        gains = None  # a score that cannot rank (e.g. all candidates alike) is no feature
    starts = set(p.options.get("priors", DEFAULT_PRIORS))
    priors = [(n, c) for n, c in priors if n in starts]
    ranks = [{int(c): k for k, c in enumerate(lad)} for lad in ladders]  # candidate -> level
    initial = np.array([[r[c] for r, c in zip(ranks, choice, strict=True)]
                        for _, choice in priors], dtype=np.int64)
    value.pool = s.batch_evaluator(split) if hasattr(s, "batch_evaluator") else None
    if resume:
        value.load(ckpt)
    outer = o.get("progress")

    try:
        res = run_engine(space, value, replace(cfg, evaluations=engine_evals), checkpoint=ckpt,
                         resume=resume, progress=outer,
                         initial=initial if len(initial) else None, prior=gains)
        if guided is not None:
            res = _guided_phase(space, value, res, guided, budget_tokens, gains,
                                None if ckpt is None else ckpt.with_name(
                                    ckpt.name.replace("engine_state", "engine_guided")),
                                resume, cfg, outer)
    finally:
        s.swapper.restore()
        if value.pool is not None:
            value.pool.close()
    choice = tuple(int(lad[k]) for lad, k in zip(ladders, res.choice, strict=True))
    # the priors' reported cost (shared passes billed in full, read-back ones included)
    cost = {"seconds": time.perf_counter() - start - prior_wall + prior_cost["seconds"],
            "forward_passes": value.calls + prior_cost["forward_passes"],
            "backward_passes": prior_cost["backward_passes"],
            "forward_seconds": value.seconds, "evaluations": res.evaluations,
            "prior_seconds": prior_cost["seconds"], "stopped": res.stopped,
            "value_split": split, "metric": metric, **value.cost(),
            "search_block_tokens": budget_tokens,
            "trace": [[b, v, list(c)] for b, v, c in value.trace]}
    cost["block_tokens"] += int(prior_cost.get("block_tokens", 0))  # the priors' scores
    policy = choice_policy(s.groups, s.specs, choice, meta={
        "method": NAME, "backend": s.backend, "budget": str(p.budget), "model": s.model_name,
        "candidates": [spec_key(x) for x in s.specs], "seed": p.seed})
    prior_values = {n: value.seen.get(tuple(r[c] for r, c in zip(ranks, ch, strict=True)))
                    for n, ch in priors}
    info = {"search_cost": cost, "binding": [],
            "engine": engine_log(res, space, ladders, s.specs, cfg, priors, prior_values)}
    return StrategyResult(NAME, policy, cost["seconds"], cost["forward_passes"], value.seconds,
                          info, detail=Allocated(choice, choice,
                                                 _scores(res, space, ladders, len(s.specs)),
                                                 None, None, cost))




def _guided_options(p: SearchProblem, value: SessionValue, cfg: EngineConfig, need: int
                    ) -> tuple[GuidedConfig | None, int, int]:
    """(guided phase's config or None, the engine's evaluations, the whole search's
    block-token budget). The budget is `block_tokens`, or `n_evaluations` full forwards'
    worth; the engine spends `engine_share` of the evaluations (at least what one round
    needs), guided evolution the rest of the block-tokens."""
    o = p.options
    full = value.full_block_tokens()
    budget = block_token_cap(p, value, cfg.evaluations, NAME)
    on = o.get("guided", value.lm)
    share = o.get("engine_share", ENGINE_SHARE)
    if not isinstance(on, bool):
        raise SmpqError(f"guided of {NAME} must be true or false, got {on!r}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise SmpqError(f"engine_share of {NAME} must be in (0, 1], got {share!r}")
    if not on:
        return None, cfg.evaluations, int(budget)
    evals = max(need, int(round(share * budget / full)))
    ref = value.s.refs[value.split]
    total = len(ref.blocks) if value.lm else len(ref.inputs.batches)
    screen = o.get("screen_blocks", max(1, total // 4))
    if screen is not None and (isinstance(screen, bool) or not isinstance(screen, int)
                               or screen < 1):
        raise SmpqError(f"screen_blocks of {NAME} must be a positive integer, got {screen!r}")
    try:
        gcfg = GuidedConfig(block_tokens=int(budget), seed=p.seed,
                            offspring=o.get("offspring", GuidedConfig.offspring),
                            survivors=o.get("survivors", GuidedConfig.survivors),
                            screen_blocks=None if screen is None or screen >= total
                            else screen)
    except TypeError as err:
        raise SmpqError(f"bad {NAME} option: {err}") from None
    return gcfg, evals, int(budget)


def _guided_phase(space: PolicySpace, value: SessionValue, res: EngineResult,
                  cfg: GuidedConfig, budget: int, prior: np.ndarray | None,
                  ckpt: Path | None, resume: bool, ecfg: EngineConfig,
                  progress: Any = None) -> EngineResult:
    """Guided evolution (`smpq.engine.guided`) from the engine's best with the block-tokens
    the engine left; the credits are refitted on every full-fidelity evaluation. The
    engine's evaluations are charged at the full price (what prefix reuse saved there is
    not passed on), so a resumed search, whose engine phase is read back, not re-run,
    gives the guided phase the same budget. Progress is reported as the engine's:
    (full-evaluation equivalents spent, planned, best)."""
    data = ([tuple(c) for c in value.seen], list(value.seen.values()))
    full = value.full_block_tokens()
    done = res.evaluations * full
    left = max(0, budget - done)

    def tick(spent: int, _total: int, best: float) -> None:
        progress(int((done + spent) // full), int(budget // full), best)

    g: GuidedResult = guided_search(space, value, np.array(res.choice), replace(
        cfg, block_tokens=left), data=data, start_value=res.value, prior=prior,
        checkpoint=ckpt, resume=resume, progress=tick if progress is not None else None)
    xs, ys = np.array(g.choices), np.array(g.values)
    model = fit_model(space, xs, ys, seed=ecfg.seed, prior=prior)
    se = bootstrap_shapley(space, xs, ys, model, n_boot=ecfg.bootstrap, seed=ecfg.seed,
                           prior=prior)
    ok = space.fits(xs)
    best = max((v for v, f in zip(ys, ok, strict=True) if f), default=g.value)
    choice = g.choice if g.value >= best else tuple(
        int(x) for x in xs[int(np.argmax(np.where(ok, ys, -np.inf)))])
    history = res.history + [max(res.value, v) for _, v in g.curve[1:]]
    return replace(res, choice=choice, value=max(g.value, best), evaluations=len(ys),
                   history=history, shapley=model.shapley(space).tolist(),
                   shapley_se=se.tolist(), interactions=model.top_interactions(space),
                   interaction_matrix=model.interaction_matrix(space),
                   r2_cv=float(model.r2_cv), stopped=f"guided {g.stopped}",
                   rounds=res.rounds + [{"guided": {
                       "generations": g.generations, "improvements": g.improvements,
                       "evaluations": g.evaluations, "block_tokens": g.block_tokens,
                       "curve": [list(c) for c in g.curve]}}])


def _scores(res: EngineResult, space: PolicySpace, ladders: tuple[np.ndarray, ...],
            n_candidates: int) -> tuple[np.ndarray, ...]:
    """Per group, per candidate (candidate order): the surrogate's ladder Shapley values
    summed up the unit's ladder (0 at the cheapest, nan where the group cannot store the
    candidate), as `choice_scores` does for the game."""
    phi = np.asarray(res.shapley, float)
    rows: list[list[float]] = [[] for _ in ladders]
    for (u, _, _), v in zip(space.players, phi, strict=True):  # unit order, steps in order
        rows[u].append(float(v))
    out = []
    for lad, row in zip(ladders, rows, strict=True):
        scores = np.full(n_candidates, np.nan)
        scores[lad] = np.concatenate([[0.0], np.cumsum(row)])
        out.append(scores)
    return tuple(out)


def engine_log(res: EngineResult, space: PolicySpace, ladders: tuple[np.ndarray, ...],
               specs: Any, cfg: EngineConfig, priors: list, prior_values: dict) -> dict:
    """What contributions.json and summary.json show of the search (JSON-able)."""
    from smpq.transformer.mixed import spec_key

    keys = [[spec_key(specs[i]) for i in lad] for lad in ladders]
    players = [{"group": u, "unit": space.units[u],
                "step": f"{keys[u][k - 1]}->{keys[u][k]}",
                "estimate": phi, "stderr": se}
               for (u, _, k), phi, se in zip(space.players, res.shapley, res.shapley_se,
                                             strict=True)]
    return {"method": NAME, "value": "-log KL (encoders: -log cosine distance) or -NLL",
            "best_value": res.value, "evaluations": res.evaluations, "stopped": res.stopped,
            "r2_cv": res.r2_cv, "value_curve": res.history, "rounds": res.rounds,
            "priors": {n: {"choice": list(c), "value": prior_values.get(n)}
                       for n, c in priors},
            "players": players, "interactions": res.interactions, "config": asdict(cfg)}
