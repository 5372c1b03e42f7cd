"""Plain searches over whole policies, the peers `shapley-loop` must beat at equal budgets.

All spend the same compute on the same value as `shapley-loop` and keep the best feasible
policy they evaluated. Compute is counted in block-tokens (tokens x transformer blocks run;
prefix reuse makes a forward that changes only late blocks cheaper): the `block_tokens`
option, or `n_evaluations` full forwards' worth; `value_split` and `metric` as there.

| name   | what                                                                              |
|--------|-----------------------------------------------------------------------------------|
| random | policies drawn on the budget frontier (`PolicySpace.random_maximal`: ladder steps |
|        | added in random order while they fit), evaluated in order                         |
| local  | first-improvement local search from the Fisher allocation: a move raises one unit |
|        | a level and lowers another of equal size (the same cost row) a level, so the      |
|        | budget stays met; moves are tried in random order, the first that improves is     |
|        | kept, and the move list is drawn again; without any equal-size partner, any       |
|        | feasible partner                                                                  |

| evopress | EvoPress (`smpq.engine.evopress`): an elitist evolution from the uniform   |
|        | policy by level switches, offspring ranked on the first token blocks of the     |
|        | split and the best re-ranked on more, the last stage on all of them            |

evopress's options: n_evaluations (full-evaluation equivalents: its block-token cap is
n_evaluations x one full evaluation's block-tokens, the compute random and local spend) or
block_tokens (the cap itself; with both, the smaller), offspring (16), stages ((n_blocks,
survivors) pairs, the last (None, 1); stages at or above the split's block count merge
into the full one), generations (no cap by default).

The local search is simple and, once evaluations are spent, hard to beat: its start is the
cheap score's answer, and every step is measured. Its Fisher scoring time counts in its cost.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from smpq.engine.evopress import EvoConfig, evopress
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.strategy import SearchProblem, StrategyResult, register
from smpq.transformer.engine_strategy import (
    DEFAULT_EVALUATIONS,
    SessionValue,
    block_token_cap,
    policy_space,
    prefix_cache_bytes,
    unit_ladders,
    value_options,
)

__all__ = ["evopress_search", "local_moves", "local_search", "random_search"]


def _setup(p: SearchProblem, name: str
           ) -> tuple[Any, PolicySpace, tuple[np.ndarray, ...], SessionValue, int]:
    if p.budget is None:
        raise SmpqError(f"{name} needs a budget")
    s, o = p.model, p.options
    split, metric = value_options(p, name)
    n = int(o.get("n_evaluations", DEFAULT_EVALUATIONS))
    if n < 1:
        raise SmpqError(f"{name} needs at least one evaluation, got {n}")
    resolved = o.get("resolved") or s.resolve(p.budget)
    space, order = policy_space(s, p.budget, resolved)
    space.check_feasible()
    ladders = unit_ladders(s, order)  # per group: level -> candidate index
    cache_bytes = prefix_cache_bytes(p, name)
    value = SessionValue(s, ladders, split, metric, n, name, cache_bytes)
    value.fits = space.fits
    return s, space, ladders, value, n


def _result(name: str, p: SearchProblem, s: Any, ladders: tuple[np.ndarray, ...],
            levels: np.ndarray,
            value: SessionValue, start: float, extra: dict, curve: list[float],
            more: dict | None = None) -> StrategyResult:
    from smpq.transformer.mixed import choice_policy, spec_key
    from smpq.transformer.strategies import Allocated

    choice = tuple(int(lad[k]) for lad, k in zip(ladders, levels, strict=True))
    cost = {"seconds": time.perf_counter() - start,
            "forward_passes": value.calls + extra.get("forward_passes", 0),
            "backward_passes": extra.get("backward_passes", 0),
            "forward_seconds": value.seconds, "evaluations": value.calls,
            "prior_seconds": extra.get("seconds", 0.0), **value.cost(), **(more or {}),
            "trace": [[b, v, list(c)] for b, v, c in value.trace]}
    cost["block_tokens"] += int(extra.get("block_tokens", 0))  # the start's scores
    policy = choice_policy(s.groups, s.specs, choice, meta={
        "method": name, "backend": s.backend, "budget": str(p.budget), "model": s.model_name,
        "candidates": [spec_key(x) for x in s.specs], "seed": p.seed})
    scores = tuple(np.zeros(len(s.specs)) for _ in s.groups)  # a search has no scores
    info = {"search_cost": cost, "binding": [], "value_curve": curve}
    return StrategyResult(name, policy, cost["seconds"], cost["forward_passes"], value.seconds,
                          info, detail=Allocated(choice, choice, scores, None, None, cost))


def _curve(values: list[float]) -> list[float]:
    return np.maximum.accumulate(np.asarray(values, float)).tolist() if values else []


@register("random", kind="transformer")
def random_search(p: SearchProblem) -> StrategyResult:
    """The best random policies on the budget frontier that `n_evaluations` full forwards'
    worth of block-tokens (or `block_tokens`) buy."""
    s, space, ladders, value, n = _setup(p, "random")
    cap = block_token_cap(p, value, n, "random")
    start = time.perf_counter()
    rng = np.random.default_rng([p.seed, 7])
    seen: dict[tuple[int, ...], float] = {}
    vals: list[float] = []
    try:
        tries, most = 0, 20 * max(n, cap // value.full_block_tokens())
        while value.block_tokens < cap and tries < most:  # small spaces: fewer policies
            tries += 1
            c = tuple(int(x) for x in space.random_maximal(rng, 1)[0])
            if c in seen:
                continue
            seen[c] = float(value(np.array([c]))[0])
            vals.append(seen[c])
    finally:
        s.swapper.restore()
    best = max(seen, key=seen.__getitem__)
    return _result("random", p, s, ladders, np.array(best), value, start, {}, _curve(vals))


def local_moves(space: PolicySpace, levels: np.ndarray, rng: np.random.Generator,
                metric: str | None = None) -> list[tuple[int, int]]:
    """(up, down) unit pairs, in random order, whose move keeps `levels` within the budget:
    `up` one level higher, `down` one lower; equal-size partners (the same cost row under
    `metric`) only, unless a unit has none."""
    metric = metric or ("size" if "size" in space.costs else next(iter(space.costs)))
    rows = [np.asarray(r, float) for r in space.costs[metric]]
    tops = [space.n_choices(u) - 1 for u in range(space.n_units)]
    moves = []
    for u in range(space.n_units):
        if levels[u] >= tops[u]:
            continue
        downs = [v for v in range(space.n_units) if v != u and levels[v] > 0]
        same = [v for v in downs if rows[v].shape == rows[u].shape
                and np.allclose(rows[v], rows[u])]
        for v in same or downs:
            moves.append((u, v))
    if not moves:
        return []
    cand = np.repeat(np.asarray(levels, np.int64)[None], len(moves), axis=0)
    idx = np.arange(len(moves))
    ups, dns = np.array([m[0] for m in moves]), np.array([m[1] for m in moves])
    cand[idx, ups] += 1
    cand[idx, dns] -= 1
    ok = space.fits(cand)
    keep = [moves[i] for i in rng.permutation(len(moves)) if ok[i]]
    return keep


@register("local", kind="transformer")
def local_search(p: SearchProblem) -> StrategyResult:
    """First-improvement pair swaps from the Fisher allocation (module docstring)."""
    from smpq import strategy

    s, space, ladders, value, n = _setup(p, "local")
    cap = block_token_cap(p, value, n, "local")
    start = time.perf_counter()
    opts = {k: v for k, v in p.options.items() if k in ("config", "resolved")}
    fisher = strategy.get(p.options.get("start", "fisher"), "transformer")(SearchProblem(
        p.model, p.cost, p.budget, p.w_specs, seed=p.seed, options=opts))
    ranks = [{int(c): k for k, c in enumerate(lad)} for lad in ladders]  # candidate -> level
    cur = np.array([r[int(c)] for r, c in zip(ranks, fisher.detail.choice, strict=True)],
                   dtype=np.int64)
    rng = np.random.default_rng([p.seed, 11])
    vals: list[float] = []
    try:
        best = float(value(cur[None])[0])
        vals.append(best)
        seen = {tuple(cur.tolist())}
        improved = True
        while improved and value.block_tokens < cap:
            improved = False
            for u, v in local_moves(space, cur, rng):
                nxt = cur.copy()
                nxt[u] += 1
                nxt[v] -= 1
                key = tuple(nxt.tolist())
                if key in seen:
                    continue
                seen.add(key)
                got = float(value(nxt[None])[0])
                vals.append(got)
                if got > best:
                    cur, best, improved = nxt, got, True
                    break
                if value.block_tokens >= cap:
                    break
    finally:
        s.swapper.restore()
    return _result("local", p, s, ladders, cur, value, start, fisher.detail.cost,
                   _curve(vals))


def _evo_config(p: SearchProblem, value: SessionValue, n: int) -> EvoConfig:
    """EvoPress's settings from the options, stages fitted to the split's block count."""
    o = p.options
    full = value.full_block_tokens(None)
    ref = p.model.refs[value.split]
    n_total = len(ref.blocks) if hasattr(ref, "blocks") else len(ref.inputs.batches)
    try:
        cap = n * full
        if "block_tokens" in o:
            given = int(o["block_tokens"])
            cap = min(given, cap) if "n_evaluations" in o else given
        if cap < full:
            raise SmpqError(f"evopress's block-token cap {cap} is below one full evaluation "
                            f"({full} block-tokens)")
        stages = [(None if b in (None, "full") else int(b), int(k))
                  for b, k in o.get("stages", EvoConfig.stages)]
        gens = o.get("generations")
        EvoConfig(stages=tuple(stages), generations=1)  # as given, before the fit
        return EvoConfig(offspring=int(o.get("offspring", EvoConfig.offspring)),
                         stages=tuple((b, k) for b, k in stages if b is None or b < n_total),
                         block_tokens=cap, seed=p.seed,
                         generations=None if gens is None else int(gens))
    except (TypeError, ValueError) as err:
        raise SmpqError(f"bad evopress option: {err}".splitlines()[0]) from None


@register("evopress", kind="transformer")
def evopress_search(p: SearchProblem) -> StrategyResult:
    """EvoPress's evolutionary search on the session's value (module docstring)."""
    s, space, ladders, value, n = _setup(p, "evopress")
    cfg = _evo_config(p, value, n)
    start = time.perf_counter()
    try:
        res = evopress(space, value, cfg)
    finally:
        s.swapper.restore()
    more = {"counts": res.counts, "generations": res.generations, "stopped": res.stopped}
    out = _result("evopress", p, s, ladders, res.levels, value, start, {},
                  _curve(res.history), more)
    out.info["evopress"] = {"value": res.value, "curve": [list(c) for c in res.curve],
                            "config": cfg.to_dict(), **more}
    return out
