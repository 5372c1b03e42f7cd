"""Shapley-guided evolution: the default allocator's second phase on expensive values.

The engine (`engine.loop`) fits a pairwise surrogate whose ladder Shapley values credit every
step. Where that surrogate is good it solves the allocation outright; where interactions are
strong (LLMs at 2-2.5 bits) it is not, and measured whole-policy moves win. This phase spends
the rest of a block-token budget on such moves, chosen with the credits and filtered cheaply:

1. Offspring. From the incumbent, every feasible *level switch* (one unit a level up, another
   a level down, as EvoPress and `local` do), every single step up that the budget's slack
   allows, and random chains of equal-cost switches (longer while the incumbent is stuck)
   form a pool. The offspring are the surrogate's best unseen policy anywhere (its exact
   MILP solve), the pool's best by the surrogate (the credits' prediction: free) for half
   of them, and random members of the pool (EvoPress's exploration) for the rest.
2. Multi-fidelity selection. Every offspring is measured on the first `screen_blocks` token
   blocks (a fraction of a forward); the `survivors` best, by their low-fidelity gain over the
   parent's own low-fidelity value, are measured at full fidelity. Only full-fidelity values
   are ever compared with the incumbent or returned (the successive-halving rule).
3. Elitism. The incumbent is replaced only by a better full-fidelity policy; the surrogate is
   refitted on every full-fidelity evaluation after each generation, so the credits (and the
   next generation's exploitation half) learn from the moves.

The search sees the model only through `value(choices, n_blocks) -> values` (higher is
better; `n_blocks=None` is full fidelity) and `price(choices, n_blocks)`-free accounting: the
value object's `block_tokens` counter (tokens x transformer blocks run) is read after each
call, so prefix reuse makes moves cheaper and the budget buys more of them. Every call is
memoised with its cost in a JSON-able state, saved after each generation: a resumed run
replays the same generations (seeded per generation) from the memo at no cost and continues.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from smpq.engine.model import QuadraticModel, fit_model
from smpq.engine.solve import quadratic_topk
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text

__all__ = ["GuidedConfig", "GuidedResult", "guided_search", "switch_moves"]

STATE_VERSION = 1


class FidelityValue(Protocol):
    block_tokens: int

    def __call__(self, choices: np.ndarray, n_blocks: int | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class GuidedConfig:
    """`block_tokens`: the budget of this phase; `screen_blocks`: the low fidelity (token
    blocks); `offspring` per generation, of which `survivors` reach full fidelity."""

    block_tokens: int
    offspring: int = 8
    survivors: int = 2
    screen_blocks: int | None = 2
    doubles: int = 64
    patience: int = 1_000_000
    seed: int = 0
    time_limit: float = 30.0  # seconds for the surrogate's exact solve per generation

    def __post_init__(self) -> None:
        for name in ("block_tokens", "offspring", "survivors", "doubles", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise SmpqError(f"{name} must be an integer, got {v!r}")
        if self.block_tokens < 0:
            raise SmpqError(f"the block-token budget must be >= 0, got {self.block_tokens}")
        if self.offspring < 1 or not 1 <= self.survivors <= self.offspring:
            raise SmpqError("need offspring >= 1 and 1 <= survivors <= offspring, got "
                            f"{self.offspring} and {self.survivors}")
        if self.screen_blocks is not None and self.screen_blocks < 1:
            raise SmpqError(f"screen_blocks must be >= 1, got {self.screen_blocks}")


@dataclass
class GuidedResult:
    choice: tuple[int, ...]
    value: float
    block_tokens: int
    generations: int
    improvements: int
    evaluations: dict[str, int] = field(default_factory=dict)  # per fidelity
    curve: list[tuple[int, float]] = field(default_factory=list)  # (block-tokens, best)
    choices: list[tuple[int, ...]] = field(default_factory=list)  # full-fidelity data
    values: list[float] = field(default_factory=list)
    stopped: str = "budget"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def switch_moves(space: PolicySpace, levels: np.ndarray, metric: str | None = None,
                 same: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) feasible level switches (up unit, down unit) of `levels`: `up` one level higher,
    `down` one lower, the result within every limit. Partners of equal cost rows (the same
    size under `metric`) only, among those that can step down; any partner for a unit that
    has none (the rule of `local`). `same`: `equal_cost(space, metric)`, if already known."""
    levels = np.asarray(levels, np.int64)
    n = space.n_units
    tops = np.array([space.n_choices(u) - 1 for u in range(n)])
    up, dn = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ok = (up != dn) & (levels[up] < tops[up]) & (levels[dn] > 0)
    same = equal_cost(space, metric) if same is None else same
    has = (same & ok).any(axis=1, keepdims=True)
    ok &= np.where(has, same, True)
    pairs = np.stack([up[ok], dn[ok]], axis=1)
    if not len(pairs):
        return pairs.reshape(0, 2)
    return pairs[space.fits(_apply(levels, pairs))]


def equal_cost(space: PolicySpace, metric: str | None = None) -> np.ndarray:
    """(n, n) whether two units have the same cost row under `metric` (default: size)."""
    metric = metric or ("size" if "size" in space.costs else next(iter(space.costs), None))
    n = space.n_units
    if metric is None:
        return np.ones((n, n), bool)
    rows = [np.asarray(r, float) for r in space.costs[metric]]
    groups: dict[tuple, int] = {}
    ids = np.array([groups.setdefault((r.shape, tuple(np.round(r, 9))), len(groups))
                    for r in rows])
    return ids[:, None] == ids[None, :]


def _apply(levels: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    cand = np.repeat(np.asarray(levels, np.int64)[None], len(pairs), axis=0)
    idx = np.arange(len(pairs))
    cand[idx, pairs[:, 0]] += 1
    cand[idx, pairs[:, 1]] -= 1
    return cand


def _neighbours(space: PolicySpace, levels: np.ndarray) -> np.ndarray:
    """Every feasible policy one switch (any partner) or one step up (using slack) away."""
    n = space.n_units
    tops = np.array([space.n_choices(u) - 1 for u in range(n)])
    up, dn = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ok = (up != dn) & (levels[up] < tops[up]) & (levels[dn] > 0)
    cand = [_apply(levels, np.stack([up[ok], dn[ok]], axis=1))]
    raise_ = np.flatnonzero(levels < tops)
    ups = np.repeat(levels[None], len(raise_), axis=0)
    ups[np.arange(len(raise_)), raise_] += 1
    cand.append(ups)
    cand = np.concatenate(cand).reshape(-1, n)
    return cand[space.fits(cand)] if len(cand) else cand


def _pool(space: PolicySpace, parent: np.ndarray, rng: np.random.Generator,
          chains: int, reach: int) -> np.ndarray:
    """The feasible neighbours of `parent` (`_neighbours`), plus `chains` random chains of
    2..`reach` equal-cost switches from them (the reach grows while the incumbent is stuck,
    so a local optimum is escaped)."""
    same = equal_cost(space)
    single = _neighbours(space, np.asarray(parent, np.int64))
    extra = []
    for _ in range(chains if len(single) else 0):
        cur = single[rng.integers(len(single))]
        for _ in range(int(rng.integers(1, max(reach, 2)))):
            more = switch_moves(space, cur, same=same)
            if not len(more):
                break
            cur = _apply(cur, more[rng.integers(len(more))][None])[0]
        extra.append(cur)
    pool = np.concatenate([single, np.array(extra, np.int64).reshape(-1, len(parent))])
    return np.unique(pool, axis=0) if len(pool) else pool


class _Memo:
    """Every value call's result and block-token cost, by (policy, fidelity): a resumed run
    replays from it, and nothing is measured twice."""

    def __init__(self, value: FidelityValue, budget: int, saved: dict | None):
        self.value, self.budget = value, budget
        self.table: dict[str, tuple[float, int]] = dict(
            (k, (float(v), int(c))) for k, (v, c) in (saved or {}).items())
        self.spent = 0
        self.counts: dict[str, int] = {}

    @staticmethod
    def key(choice: np.ndarray, n_blocks: int | None) -> str:
        return f"{n_blocks}:" + ",".join(str(int(x)) for x in choice)

    def __call__(self, choices: np.ndarray, n_blocks: int | None) -> np.ndarray:
        out = np.empty(len(choices))
        for i, c in enumerate(choices):
            k = self.key(c, n_blocks)
            if k not in self.table:
                before = int(getattr(self.value, "block_tokens", 0))
                v = float(np.asarray(self.value(np.asarray(c)[None], n_blocks))[0])
                if not math.isfinite(v):
                    raise SmpqError("the value function returned a non-finite value")
                self.table[k] = (v, int(getattr(self.value, "block_tokens", 0)) - before)
            v, cost = self.table[k]
            self.spent += cost
            tag = "full" if n_blocks is None else str(n_blocks)
            self.counts[tag] = self.counts.get(tag, 0) + 1
            out[i] = v
        return out


RESELECT = 1.25  # choose the surrogate's hyper-parameters again once the data grew this much


def _fit(space: PolicySpace, full: dict, seed: int, prior: np.ndarray | None,
         hyper: tuple[int, float, float] | None
         ) -> tuple[QuadraticModel, tuple[int, float, float]]:
    """The surrogate on the full-fidelity data; cross-validated model selection only when the
    data has grown by RESELECT since the last (as the engine's loop)."""
    x, y = np.array(list(full)), np.array(list(full.values()))
    if hyper is None or len(y) >= RESELECT * hyper[0]:
        m = fit_model(space, x, y, seed=seed, prior=prior)
        return m, (len(y), m.lam, m.pair_scale)
    return fit_model(space, x, y, seed=seed, lam=hyper[1], pair_scale=hyper[2],
                     prior=prior), hyper


def guided_search(space: PolicySpace, value: FidelityValue, start: np.ndarray,
                  config: GuidedConfig, *, data: tuple[list, list] = ([], []),
                  start_value: float | None = None, prior: np.ndarray | None = None,
                  checkpoint: str | Path | None = None, resume: bool = False,
                  progress: Callable[[int, int, float], None] | None = None) -> GuidedResult:
    """Improve `start` (feasible levels) within `config.block_tokens` (module docstring).

    `data`: full-fidelity (choices, values) already measured (the engine's), for the
    surrogate; `start_value`: the start's full-fidelity value if known (else measured)."""
    cfg = config
    start = np.asarray(start, np.int64)
    if not space.fits(start[None])[0]:
        raise SmpqError("the guided search must start from a policy within the budget")
    path = Path(checkpoint) if checkpoint is not None else None
    saved = None
    if resume and path is not None and path.is_file():
        try:
            st = json.loads(path.read_text())
            if st.get("version") != STATE_VERSION or st.get("config") != asdict(cfg):
                raise SmpqError("the guided-search checkpoint belongs to another search; use "
                                "a fresh --out or drop --resume")
            saved = st["memo"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SmpqError(f"cannot resume from {path}: {e}") from None
    memo = _Memo(value, cfg.block_tokens, saved)

    def save() -> None:
        if path is not None:
            atomic_write_text(path, json.dumps({
                "version": STATE_VERSION, "config": asdict(cfg),
                "memo": {k: [v, c] for k, (v, c) in memo.table.items()}}) + "\n")

    xs = [tuple(int(x) for x in c) for c in data[0]]
    ys = [float(v) for v in data[1]]
    full: dict[tuple[int, ...], float] = dict(zip(xs, ys, strict=True))
    parent = start
    pv = full.get(tuple(parent.tolist()), start_value)
    if pv is None:
        pv = float(memo(parent[None], None)[0])
        full[tuple(parent.tolist())] = pv
    curve = [(memo.spent, pv)]
    low = cfg.screen_blocks
    gen = improvements = stale = 0
    stopped = "budget"
    model: QuadraticModel | None = None
    hyper: tuple[int, float, float] | None = None
    # a generation's cost is estimated by the previous generation's, or before the first by
    # the full price of its evaluations (when the value can price them:
    # `full_block_tokens(n_blocks)`); the last one is cut to fit the budget
    price = getattr(value, "full_block_tokens", None)
    last = (0 if price is None else cfg.offspring * price(None) if low is None else
            (cfg.offspring + 1) * price(low) + cfg.survivors * price(None))
    full_price = None if price is None else price(None)
    while memo.spent < cfg.block_tokens:
        left = cfg.block_tokens - memo.spent
        if full_price is not None and left < full_price:
            break  # not even one full-fidelity evaluation fits
        # the last generation is cut to what is left (fewer offspring and survivors)
        share = 1.0 if last <= left else left / last
        n_kids = max(1, int(cfg.offspring * share))
        n_surv = max(1, min(n_kids, int(round(cfg.survivors * share))))
        begun = memo.spent
        rng = np.random.default_rng([cfg.seed, gen, 7])
        pool = _pool(space, parent, rng, cfg.doubles, 2 + stale)
        fresh = np.array([c for c in pool if tuple(c.tolist()) not in full], np.int64
                         ).reshape(-1, space.n_units)
        if len(full) >= 4:
            model, hyper = _fit(space, full, cfg.seed, prior, hyper)
        glob = np.zeros((0, space.n_units), np.int64)
        if model is not None:  # the surrogate's best unseen policy anywhere (exact MILP)
            linear, quad = model.choice_tables(space)
            glob = np.array(quadratic_topk(space, linear, quad, k=1, exclude=list(full),
                                           time_limit=cfg.time_limit), np.int64
                            ).reshape(-1, space.n_units)
        if not len(fresh) and not len(glob):
            stopped = "exhausted"
            break
        n_off = min(n_kids, len(fresh) + len(glob))
        exploit: list[int] = []
        if model is not None and len(fresh):
            order = np.argsort(-model.predict(space, fresh), kind="stable")
            exploit = list(order[: n_off // 2])
        rest = np.setdiff1d(np.arange(len(fresh)), exploit)
        explore = list(rng.choice(rest, size=min(n_off - len(exploit) - len(glob), len(rest)),
                                  replace=False)) if len(rest) else []
        kids = np.unique(np.concatenate([glob, fresh[np.array(exploit + explore, np.int64)]
                                         .reshape(-1, space.n_units)]), axis=0)
        if low is not None and len(kids) > n_surv:
            base = memo(parent[None], low)[0]
            lows = memo(kids, low) - base
            kids = kids[np.argsort(-lows, kind="stable")[:n_surv]]
        vals = memo(kids, None)
        for c, v in zip(kids, vals, strict=True):
            full[tuple(int(x) for x in c)] = float(v)
        best = int(np.argmax(vals))
        gen += 1
        last = memo.spent - begun
        if vals[best] > pv:
            parent, pv = kids[best], float(vals[best])
            improvements += 1
            stale = 0
        else:
            stale += 1
        curve.append((memo.spent, pv))
        save()
        if progress is not None:
            progress(min(memo.spent, cfg.block_tokens), cfg.block_tokens, pv)
        if stale >= cfg.patience:
            stopped = "stable"
            break
    save()
    return GuidedResult(tuple(int(x) for x in parent), pv, memo.spent, gen, improvements,
                        dict(memo.counts), curve, list(full), list(full.values()), stopped)
