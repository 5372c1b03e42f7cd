"""Two baselines for the default allocator at equal evaluation budgets: evolution and CLADO.

| name      | what                                                                            |
|-----------|---------------------------------------------------------------------------------|
| evolution | regularised (aging) evolution, Real et al. 2019, over feasible policies         |
| clado     | CLADO, Deng et al. 2023: single and pairwise loss changes measured from the    |
|           | richest policy, then the exact integer quadratic program under the budget      |

Both see the model only through `evaluate(choices (n, units)) -> values (n,)` on an
`engine.PolicySpace`, like the engine, so tests can plant a value function. One evaluation is
one new policy (one forward pass over the validation split).

Evolution: a population of P feasible policies drawn uniformly (`smpq.alloc.sample_feasible`);
each step samples S members, mutates the best (one layer's (w, a) pair changed to another
random pair, then repaired: random other layers lowered one ladder step at a time until the
policy fits; a mutation that cannot be repaired or was seen before is redrawn), evaluates
the child, appends it and removes the oldest member. Returns the best evaluated policy.

CLADO: the reference r is every layer at its richest pair. Singles d_u(k) = v(r; u=k) - v(r)
for every layer and pair; pairs d_uv(k, l) = v(r; u=k, v=l) - v(r) - d_u(k) - d_v(l) for the
`pair_moves` cheapest pairs of each layer (all 16 x 16 per layer pair is too many
evaluations: 120 pairs of layers x 225 = 27,000 on 16 layers). The objective
v(r) + sum_u d_u + sum_uv d_uv is maximised exactly by `smpq.alloc.allocate_topk`.
It works on the raw value (CLADO adds loss changes); the count is 1 + singles + pairs, and
`pair_moves` is lowered (then pairs of layers sampled) until it fits `n_evaluations`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from smpq import alloc
from smpq.cnn.search.engine_search import _engine_value, checked_metric, deployed_setup
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.strategy import SearchProblem, StrategyResult, register

__all__ = ["CladoResult", "EvolutionResult", "aging_evolution", "clado", "clado_objective",
           "feasible_sample", "mutate"]

Evaluate = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- shared


def feasible_sample(space: PolicySpace, n: int, rng: np.random.Generator) -> np.ndarray:
    """n policies (n, units) drawn uniformly, with replacement, from the feasible set."""
    if not space.limits:
        sizes = np.array([space.n_choices(u) for u in range(space.n_units)])
        return rng.integers(0, sizes, size=(n, space.n_units))
    off = {m: float(space.offsets.get(m, 0.0)) for m in space.limits}
    costs = {m: list(space.costs[m]) for m in space.limits}
    limits = {m: float(lim) - off[m] for m, lim in space.limits.items()}
    scales = {m: abs(float(lim)) for m, lim in space.limits.items()}
    return alloc.sample_feasible(costs, limits, n, rng, scales=scales)


# ---------------------------------------------------------------------------- evolution


@dataclass
class EvolutionResult:
    choice: tuple[int, ...]
    value: float
    evaluations: int
    history: list[float] = field(default_factory=list)  # best value after each evaluation
    stopped: str = "budget"


def mutate(space: PolicySpace, parent: np.ndarray, rng: np.random.Generator,
           tries: int = 50) -> np.ndarray | None:
    """One layer's choice changed to another random one, repaired to fit the limits.

    Repair lowers one ladder step of a random other unit at a time (never the mutated unit)
    until the policy fits; None when `tries` draws all fail (nothing to change or repair).
    """
    movable = [u for u in range(space.n_units) if space.n_choices(u) > 1]
    if not movable:
        return None
    for _ in range(tries):
        child = np.array(parent, dtype=np.int64)
        u = int(rng.choice(movable))
        new = int(rng.integers(0, space.n_choices(u) - 1))
        child[u] = new + (new >= child[u])
        if _repair(space, child, u, rng):
            return child
    return None


def _repair(space: PolicySpace, child: np.ndarray, keep: int, rng: np.random.Generator) -> bool:
    levels = space.levels(child)[0]
    dims = [j for j, (u, _) in enumerate(space.dims) if u != keep]
    while not space.fits(space.from_levels(levels))[0]:
        lowerable = [j for j in dims if levels[j] > 0]
        if not lowerable:
            return False
        levels[int(rng.choice(lowerable))] -= 1
    child[:] = space.from_levels(levels)[0]
    return True


def aging_evolution(space: PolicySpace, evaluate: Evaluate, n_evaluations: int = 300,
                    population: int = 20, sample: int = 5, seed: int = 0) -> EvolutionResult:
    """Regularised evolution (module docstring); never evaluates a policy twice."""
    if n_evaluations < 1 or population < 1 or not 1 <= sample <= population:
        raise SmpqError("evolution needs n_evaluations >= 1, population >= 1 and "
                        f"1 <= sample <= population (got {n_evaluations}, {population}, {sample})")
    space.check_feasible()
    rng = np.random.default_rng(seed)
    seen: dict[tuple[int, ...], float] = {}
    history: list[float] = []
    pop: deque[tuple[tuple[int, ...], float]] = deque()

    def score(c: np.ndarray) -> tuple[tuple[int, ...], float]:
        key = tuple(int(x) for x in c)
        seen[key] = v = float(evaluate(np.asarray([key]))[0])
        history.append(max(v, history[-1]) if history else v)
        return key, v

    stopped = "budget"
    draws = 0
    while len(pop) < min(population, n_evaluations) and draws < 50 * population:
        for c in feasible_sample(space, population, rng):
            draws += 1
            if tuple(int(x) for x in c) not in seen and len(pop) < min(population, n_evaluations):
                pop.append(score(c))
    if not pop:
        raise SmpqError("evolution could not draw a feasible policy")
    while len(seen) < n_evaluations:
        picks = rng.choice(len(pop), size=min(sample, len(pop)), replace=False)
        parent = max((pop[int(i)] for i in picks), key=lambda kv: kv[1])[0]
        child = None
        for _ in range(100):
            c = mutate(space, np.asarray(parent), rng)
            if c is not None and tuple(int(x) for x in c) not in seen:
                child = c
                break
        if child is None:  # the parent's neighbourhood is spent: a fresh random policy
            fresh = [c for c in feasible_sample(space, 64, rng)
                     if tuple(int(x) for x in c) not in seen]
            if not fresh:
                stopped = "exhausted"
                break
            child = fresh[0]
        pop.append(score(child))
        if len(pop) > population:
            pop.popleft()
    best = max(seen, key=seen.__getitem__)
    return EvolutionResult(best, seen[best], len(seen), history, stopped)


@register("evolution", kind="cnn", listed=False)  # a baseline: kept out of default lists
def evolution_strategy(p: SearchProblem) -> StrategyResult:
    """Options: n_evaluations (300), population (20), sample (5), metric ("neg_kl"; values
    are compared as shapley-loop compares them, -log KL), val_samples, evaluator."""
    o = p.options
    metric = checked_metric(p, "evolution")
    space, meter, ev, pspace = deployed_setup(p)
    res = aging_evolution(pspace,
                          lambda c: _engine_value(ev.values(c, metric), metric),
                          int(o.get("n_evaluations", 300)), int(o.get("population", 20)),
                          int(o.get("sample", 5)), p.seed)
    policy = space.policy(res.choice)
    info = {"metric": metric, "best_value": res.value, "history": res.history,
            "scored": res.evaluations, "stopped": res.stopped}
    return meter.result("evolution", policy, info)


# ---------------------------------------------------------------------------- CLADO


@dataclass
class CladoResult:
    choice: tuple[int, ...]
    predicted: float  # the objective at the choice (raw value units)
    evaluations: int
    objective: alloc.PairwiseObjective
    reference_value: float
    pair_moves: int
    layer_pairs: int  # pairs of layers whose interactions were measured


def _moves(space: PolicySpace, u: int, m: int) -> list[int]:
    """Unit u's m cheapest non-reference choices (by the first limited metric, then bitops)."""
    metric = next(iter(space.limits), next(iter(space.costs)))
    top = space.n_choices(u) - 1
    cost = np.asarray(space.costs[metric][u], float)
    order = [int(k) for k in np.argsort(cost, kind="stable") if k != top]
    return order[:m]


def clado_objective(space: PolicySpace, evaluate: Evaluate, n_evaluations: int | None = 300,
                    pair_moves: int = 3, seed: int = 0) -> tuple[alloc.PairwiseObjective, dict]:
    """Measure singles and pairs from the richest policy; the pairwise objective they define.

    Returns (objective, facts): facts holds the evaluation count, the reference value, the
    pair_moves used and how many pairs of layers were measured.
    """
    ref = space.richest()
    n_single = sum(space.n_choices(u) - 1 for u in range(space.n_units))
    unit_pairs = list(itertools.combinations(range(space.n_units), 2))
    if n_evaluations is not None and n_evaluations < 1 + n_single:
        raise SmpqError(f"clado needs at least {1 + n_single} evaluations (the reference and "
                        f"every single change), got {n_evaluations}")
    m = pair_moves
    while m > 0 and n_evaluations is not None and \
            1 + n_single + len(unit_pairs) * m * m > n_evaluations:
        m -= 1
    moves = [_moves(space, u, max(m, 1)) for u in range(space.n_units)]
    if m == 0:  # not even one move per layer pair fits: a random subset of layer pairs
        rng = np.random.default_rng(seed)
        room = (n_evaluations or 0) - 1 - n_single
        keep = rng.choice(len(unit_pairs), size=max(room, 0), replace=False)
        unit_pairs = [unit_pairs[int(i)] for i in sorted(keep)]
    singles, where = [], []
    for u in range(space.n_units):
        for k in range(space.n_choices(u) - 1):
            c = ref.copy()
            c[u] = k
            singles.append(c)
            where.append((u, k))
    doubles, dwhere = [], []
    for u, v in unit_pairs:
        for ku, kv in itertools.product(moves[u], moves[v]):
            c = ref.copy()
            c[u], c[v] = ku, kv
            doubles.append(c)
            dwhere.append((u, v, ku, kv))
    batch = np.asarray([ref, *singles, *doubles], dtype=np.int64).reshape(-1, space.n_units)
    vals = np.asarray(evaluate(batch), dtype=float)
    v0 = float(vals[0])
    delta = [np.zeros(space.n_choices(u)) for u in range(space.n_units)]
    for (u, k), val in zip(where, vals[1:1 + n_single], strict=True):
        delta[u][k] = val - v0
    pairs: dict[tuple[int, int], np.ndarray] = {}
    for (u, v, ku, kv), val in zip(dwhere, vals[1 + n_single:], strict=True):
        q = pairs.setdefault((u, v), np.zeros((space.n_choices(u), space.n_choices(v))))
        q[ku, kv] = val - v0 - delta[u][ku] - delta[v][kv]
    linear = [d.copy() for d in delta]
    linear[0] += v0  # the constant rides on unit 0, so the objective reads as a value
    facts = {"evaluations": len(batch), "reference_value": v0, "pair_moves": m,
             "layer_pairs": len(unit_pairs), "singles": n_single, "pairs": len(doubles)}
    return alloc.PairwiseObjective(linear, pairs), facts


def clado(space: PolicySpace, evaluate: Evaluate, n_evaluations: int | None = 300,
          pair_moves: int = 3, seed: int = 0, time_limit: float = 60) -> CladoResult:
    """CLADO's policy: the exact maximiser of the measured pairwise objective under the limits."""
    space.check_feasible()
    obj, facts = clado_objective(space, evaluate, n_evaluations, pair_moves, seed)
    off = {m: float(space.offsets.get(m, 0.0)) for m in space.limits}
    costs = {m: list(space.costs[m]) for m in space.costs}
    limits = {m: float(lim) - off[m] for m, lim in space.limits.items()}
    scales = {m: abs(float(lim)) for m, lim in space.limits.items()}
    best = alloc.allocate_topk(obj, costs, limits, 1, time_limit, scales=scales,
                               binding=False)[0]
    return CladoResult(tuple(best.choice), float(best.score), facts["evaluations"], obj,
                       facts["reference_value"], facts["pair_moves"], facts["layer_pairs"])


@register("clado", kind="cnn", listed=False)
def clado_strategy(p: SearchProblem) -> StrategyResult:
    """Options: n_evaluations (300: a cap on 1 + singles + pairs), pair_moves (3), metric
    ("neg_kl", used raw: CLADO adds value changes), val_samples, evaluator."""
    o = p.options
    metric = checked_metric(p, "clado")
    space, meter, ev, pspace = deployed_setup(p)
    cap = o.get("n_evaluations", 300)
    res = clado(pspace, lambda c: ev.values(c, metric),
                None if cap is None else int(cap), int(o.get("pair_moves", 3)), p.seed)
    info = {"metric": metric, "predicted": res.predicted, "reference_value":
            res.reference_value, "pair_moves": res.pair_moves, "layer_pairs": res.layer_pairs,
            "natural_evaluations": res.evaluations}
    return meter.result("clado", space.policy(res.choice), info)
