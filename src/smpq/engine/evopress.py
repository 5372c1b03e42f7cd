"""EvoPress: an elitist evolutionary search over ladder levels with multi-step selection.

Ported from Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via
Evolutionary Search" (ICML 2025, arXiv 2410.14649) and its public code
(github.com/IST-DASLab/EvoPress, `evo_quant_search.py`); own code, same algorithm:

1. Start. The richest uniform level that fits. If it does not meet a limit exactly (EvoPress:
   a non-integer target bit-width), start one level higher everywhere and lower random
   units one level at a time until the policy fits (EvoPress's `initially_generated`
   draws; the best of `init_candidates` of them, ranked like offspring, is the parent).
2. Mutate. Each generation makes `offspring` distinct children of the parent (none equal
   to it). A child takes `min(U{1,3}, U{1,3})` level switches (biased towards one, as
   EvoPress): raise a random unit one level, then lower a random *partner* one level, as
   long as the policy does not fit. Partners are units with the same cost row under every
   metric (EvoPress's groups of equal size, `group_rule="size"`; with equal step costs the
   totals are exactly kept) in a share `same_size` (0.75) of switches, or when a unit has
   none, any unit (EvoPress's `group_rule="none"`: lower random units until the target is
   met); more than `max_changes` (10) level changes rejects the child, as there.
3. Select. Stages (n_blocks, survivors): every candidate of the stage is valued on the
   first n_blocks token blocks and the best `survivors` go on; the last stage is at full
   fidelity (n_blocks None) and keeps one. The parent joins the last stage (elitist) and
   is replaced only by a strictly better child.

Differences from EvoPress's code, and why:
- Fidelity is a prefix of fixed blocks (the first n_blocks), not a fresh random minibatch
  per stage: values are deterministic, so each (policy, fidelity) is measured once and
  cached (the parent is never re-measured), and a prefix suits forward-prefix reuse.
- Per-unit costs (groups of our transformer differ in size, CNN layers in BitOps) and
  ladders whose steps differ in cost (int2/int3/int4/int8): a switch within an equal-size
  group keeps the total only when its two steps cost alike, and switches only within
  groups leave optima unreachable (on the brute-force games of tests/test_evopress.py, half of them
  stuck); so a quarter of the switches may take any partner, and a raise that still fits
  (budget slack) lowers nobody. Feasibility under every limit is checked after each
  change. EvoPress's "bits added / bits removed >= 0.8" filter is not ported (a child that
  leaves budget unused simply loses the selection).
- "Uniform" is a level index: on ladders of different lengths (GGUF formats a group can
  store) it is not one format everywhere, as EvoPress's uniform bit-width is.
- Ties at the last stage keep the parent; EvoPress sorts the fitnesses with the parent
  appended last.
- The search stops at a cap of block-tokens (tokens x transformer blocks run), evaluations
  or generations, whichever comes first; a stage whose price would pass a cap is cut to
  the candidates the cap still pays for (all of them at full fidelity when the split has
  too few blocks for the low stages), and not started when it pays for none; also after
  `stale` (20) generations in a row with nothing new to measure (small spaces). EvoPress
  runs a fixed number of generations.
- A fitness is any value (higher is better); the transformer strategy uses -log KL to the
  float model, EvoPress minimises KL (same order).

Defaults here are scaled to small calibration sets (16 blocks of 128 tokens): offspring 16,
stages ((1, 4), (4, 2), (None, 1)). EvoPress's quantization script uses offspring 128,
150 generations, survivors 16/4/1 on 2,048/16,384/131,072 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError

__all__ = ["EvoConfig", "EvoResult", "evopress", "initial_policy", "level_switch",
           "partner_groups"]

Value = Callable[[np.ndarray, "int | None"], np.ndarray]


@dataclass(frozen=True)
class EvoConfig:
    """EvoPress's knobs; at least one of generations, evaluations, block_tokens stops it."""

    offspring: int = 16
    stages: tuple[tuple[int | None, int], ...] = ((1, 4), (4, 2), (None, 1))
    generations: int | None = None
    evaluations: int | None = None  # value evaluations at any fidelity
    block_tokens: int | None = None  # block-tokens spent, all fidelities
    max_flips: int = 3  # switches per child: min of two U{1, max_flips} draws
    max_changes: int = 10  # a child changing more levels than this is dropped (EvoPress)
    same_size: float = 0.75  # share of switches whose partners are equal-cost units
    init_candidates: int = 1
    stale: int = 20  # generations in a row with no new evaluation end the search
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        stages = tuple((None if n is None else int(n), int(k)) for n, k in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise SmpqError("evopress needs at least one selection stage")
        if stages[-1] != (None, 1):
            raise SmpqError("evopress's last stage must be (full fidelity, 1 survivor), got "
                            f"{stages[-1]}")
        blocks = [n for n, _ in stages[:-1]]
        if any(n is None or n < 1 for n in blocks) or blocks != sorted(set(blocks)):
            raise SmpqError(f"evopress stage blocks must rise from >= 1 to full, got {stages}")
        kept = [k for _, k in stages]
        if any(k < 1 for k in kept) or kept != sorted(kept, reverse=True):
            raise SmpqError(f"evopress survivors must be >= 1 and not rise, got {kept}")
        for name in ("offspring", "max_flips", "max_changes", "init_candidates", "stale"):
            if int(getattr(self, name)) < 1:
                raise SmpqError(f"evopress {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= float(self.same_size) <= 1.0:
            raise SmpqError(f"evopress same_size must be in [0, 1], got {self.same_size}")
        for name in ("generations", "evaluations", "block_tokens"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise SmpqError(f"evopress {name} must be >= 1, got {v}")
        if self.generations is None and self.evaluations is None and self.block_tokens is None:
            raise SmpqError("evopress needs a cap: generations, evaluations or block_tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvoConfig:
        d = dict(d)
        d["stages"] = tuple(tuple(s) for s in d.get("stages", cls.stages))
        return cls(**d)


@dataclass
class EvoResult:
    """The best policy found (choices per unit, ladder levels), its full-fidelity value,
    the best-so-far value against block-tokens spent, and evaluations per fidelity."""

    choice: np.ndarray
    levels: np.ndarray
    value: float
    curve: list[tuple[int, float]]  # (block-tokens spent, best full value so far)
    counts: dict[str, int]  # fidelity ("full" or n_blocks) -> evaluations
    evaluations: int
    block_tokens: int
    generations: int
    stopped: str
    history: list[float] = field(default_factory=list)  # every full-fidelity value, in order


# --------------------------------------------------------------------------- mutation

class _Fits:
    """`space.fits` for one vector of ladder levels, fast: padded cost tables per metric
    (the switch loop checks feasibility after every level change)."""

    def __init__(self, space: PolicySpace):
        self.space = space
        self.flat = all(len(g) == 1 for g in space.grids)  # a level is the choice
        width = max(space.n_choices(u) for u in range(space.n_units))
        self.rows = np.arange(space.n_units)
        self.tables = []
        for m, lim in space.limits.items():
            t = np.zeros((space.n_units, width))
            for u, r in enumerate(space.costs[m]):
                t[u, :len(r)] = np.asarray(r, float)
            room = float(lim) + space.tolerance(m) - float(space.offsets.get(m, 0.0))
            self.tables.append((t, room))

    def __call__(self, levels: np.ndarray) -> bool:
        c = levels if self.flat else self.space.from_levels(levels)[0]
        return all(float(t[self.rows, c].sum()) <= room for t, room in self.tables)


def partner_groups(space: PolicySpace) -> list[list[int]]:
    """Per dim (`space.dims`): the other dims whose unit has the same cost row under every
    metric and the same grid, at the same dim index: EvoPress's "groups of equal size"."""
    dims = space.dims

    def same(a: int, b: int) -> bool:
        (u, d), (v, e) = dims[a], dims[b]
        if d != e or space.grids[u] != space.grids[v]:
            return False
        return all(np.allclose(np.asarray(r[u], float), np.asarray(r[v], float))
                   for r in space.costs.values())

    return [[b for b in range(len(dims)) if b != a and same(a, b)] for a in range(len(dims))]


def level_switch(space: PolicySpace, levels: np.ndarray, rng: np.random.Generator,
                 partners: list[list[int]], max_changes: int = 10, same: float = 0.75,
                 fits: Callable[[np.ndarray], bool] | None = None) -> np.ndarray | None:
    """One switch: raise a random dim one level, then lower random partners one level each
    until the policy fits; None if it cannot fit within `max_changes` level changes. With
    probability `same` the partners are equal-cost dims (when any can go down), else any dim.
    A feasible `levels` gives a feasible result. `fits`: a faster `space.fits` on levels."""
    fits = fits or _Fits(space)
    lv = np.asarray(levels, np.int64).copy()
    ups = np.flatnonzero(lv < space.tops)
    if len(ups) == 0:
        return None
    a = int(rng.choice(ups))
    lv[a] += 1
    changes = 1
    in_group = bool(rng.random() < same)
    while not fits(lv):
        pool = [b for b in partners[a] if lv[b] > 0] if in_group else []
        pool = pool or [b for b in range(len(lv)) if b != a and lv[b] > 0]
        if not pool or changes >= max_changes:
            return None
        lv[int(rng.choice(pool))] -= 1
        changes += 1
    return lv


def _child(space: PolicySpace, parent: np.ndarray, rng: np.random.Generator,
           partners: list[list[int]], cfg: EvoConfig, fits: _Fits) -> np.ndarray | None:
    flips = min(int(rng.integers(1, cfg.max_flips + 1)), int(rng.integers(1, cfg.max_flips + 1)))
    lv, changes = parent, 0
    for _ in range(flips):
        nxt = level_switch(space, lv, rng, partners, cfg.max_changes, cfg.same_size, fits)
        if nxt is None:
            return None
        changes += int(np.abs(nxt - lv).sum())
        lv = nxt
    return None if changes > cfg.max_changes else lv


def initial_policy(space: PolicySpace, rng: np.random.Generator) -> np.ndarray:
    """EvoPress's start, as ladder levels: the richest uniform level that fits when it meets
    a limit exactly, else that level + 1 everywhere (capped at each top) lowered at random
    units, one level at a time, until it fits."""
    tops = space.tops
    fits = [k for k in range(int(tops.max(initial=0)) + 1)
            if space.fits(space.from_levels(np.minimum(k, tops)))[0]]
    if not fits:
        raise SmpqError("no uniform policy fits the budget")
    k = max(fits)
    lv = np.minimum(k, tops)
    tot = space.totals(space.from_levels(lv))
    exact = any(abs(float(tot[m][0]) - float(lim)) <= space.tolerance(m)
                for m, lim in space.limits.items())
    if exact or np.all(lv == tops):
        return lv
    lv = np.minimum(k + 1, tops)
    while not space.fits(space.from_levels(lv))[0]:
        lv[int(rng.choice(np.flatnonzero(lv > 0)))] -= 1
    return lv


# --------------------------------------------------------------------------- search

class _Meter:
    """Values with a cache per (policy, fidelity) and block-token / evaluation accounting."""

    def __init__(self, space: PolicySpace, value: Any, price: Callable | None, cfg: EvoConfig):
        self.space, self.value, self.cfg = space, value, cfg
        self.price = price or getattr(value, "full_block_tokens", None)
        self.metered = hasattr(value, "block_tokens")
        if cfg.block_tokens is not None and self.price is None and not self.metered:
            raise SmpqError("a block-token cap needs price(n_blocks) or value.block_tokens")
        self.start = int(value.block_tokens) if self.metered else 0
        self.priced = 0
        self.cache: dict[tuple[Any, tuple[int, ...]], float] = {}
        self.counts: dict[str, int] = {}
        self.evaluations = 0
        self.history: list[float] = []

    @property
    def spent(self) -> int:
        return int(self.value.block_tokens) - self.start if self.metered else self.priced

    def affordable(self, n_new: int, n_blocks: int | None) -> bool:
        c = self.cfg
        if c.evaluations is not None and self.evaluations + n_new > c.evaluations:
            return False
        if c.block_tokens is None:
            return True
        if self.price is not None:
            return self.spent + n_new * int(self.price(n_blocks)) <= c.block_tokens
        return self.spent < c.block_tokens  # metered only: may pass the cap by one stage

    def __call__(self, pop: list[np.ndarray], n_blocks: int | None
                 ) -> tuple[list[np.ndarray], np.ndarray] | None:
        """(the members valued, their values) of `pop` (ladder levels) at `n_blocks`: all of
        them, or, at the end of the budget, the cached ones and as many new ones as a cap
        still allows; None when it allows none."""
        keys = [(n_blocks, tuple(int(x) for x in lv)) for lv in pop]
        new = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if new and not self.affordable(len(new), n_blocks):
            fit = max((k for k in range(len(new)) if self.affordable(k, n_blocks)), default=0)
            if fit == 0:
                return None
            drop = set(new[fit:])
            new = new[:fit]
            pop = [lv for lv, k in zip(pop, keys, strict=True) if k not in drop]
            keys = [k for k in keys if k not in drop]
        if new:
            choices = self.space.from_levels(np.array([k[1] for k in new]))
            got = np.asarray(self.value(choices, n_blocks), float).reshape(-1)
            if len(got) != len(new):
                raise SmpqError(f"the value returned {len(got)} numbers for {len(new)} policies")
            self.cache.update(zip(new, got.tolist(), strict=True))
            tag = "full" if n_blocks is None else str(n_blocks)
            self.counts[tag] = self.counts.get(tag, 0) + len(new)
            self.evaluations += len(new)
            if not self.metered and self.price is not None:
                self.priced += len(new) * int(self.price(n_blocks))
            if n_blocks is None:
                self.history.extend(got.tolist())
        return pop, np.array([self.cache[k] for k in keys])


def _select(meter: _Meter, pop: list[np.ndarray], stages: tuple, parent: np.ndarray | None
            ) -> tuple[np.ndarray, float] | None:
    """Multi-step selection; the parent joins the last stage and wins ties."""
    for i, (n_blocks, keep) in enumerate(stages):
        last = i == len(stages) - 1
        if last and parent is not None:
            pop = [parent, *pop]  # first: a stable sort keeps it on ties
        got = meter(pop, n_blocks)
        if got is None:
            return None
        pop, vals = got
        order = np.argsort(-vals, kind="stable")[:keep]
        pop = [pop[j] for j in order]
        if last:
            return pop[0], float(vals[order[0]])
    raise AssertionError("unreachable: stages end with a full-fidelity stage")


def evopress(space: PolicySpace, value: Value, cfg: EvoConfig,
             price: Callable[[int | None], int] | None = None,
             initial: np.ndarray | None = None) -> EvoResult:
    """Maximise `value(choices, n_blocks)` over the policies of `space` that fit its limits
    (module docstring). `initial` (ladder levels) replaces EvoPress's start."""
    space.check_feasible()
    rng = np.random.default_rng(cfg.seed)
    partners = partner_groups(space)
    fits = _Fits(space)
    meter = _Meter(space, value, price, cfg)
    if initial is not None:
        starts = [np.asarray(initial, np.int64)]
        if not space.fits(space.from_levels(starts[0]))[0]:
            raise SmpqError("the initial policy does not fit the budget")
    else:
        starts = [initial_policy(space, rng) for _ in range(cfg.init_candidates)]
    starts = list({tuple(s.tolist()): s for s in starts}.values())
    got = _select(meter, starts, cfg.stages if len(starts) > 1 else ((None, 1),), None)
    if got is None:
        raise SmpqError("the evopress cap is below one full-fidelity evaluation")
    parent, best = got
    curve = [(meter.spent, best)]
    gen, stopped, idle = 0, "generations", 0
    while cfg.generations is None or gen < cfg.generations:
        seen_before = meter.evaluations
        kids: dict[tuple[int, ...], np.ndarray] = {}
        pkey = tuple(parent.tolist())
        for _ in range(50 * cfg.offspring):
            if len(kids) >= cfg.offspring:
                break
            c = _child(space, parent, rng, partners, cfg, fits)
            if c is not None and tuple(c.tolist()) != pkey:
                kids.setdefault(tuple(c.tolist()), c)
        if not kids:
            stopped = "no feasible child"
            break
        got = _select(meter, list(kids.values()), cfg.stages, parent)
        if got is None:
            stopped = "cap"
            break
        gen += 1
        if got[1] > best:
            parent, best = got
        curve.append((meter.spent, best))
        idle = idle + 1 if meter.evaluations == seen_before else 0
        if idle >= cfg.stale:
            stopped = "stale"
            break
    return EvoResult(space.from_levels(parent)[0], parent, best, curve, meter.counts,
                     meter.evaluations, meter.spent, gen, stopped, meter.history)
