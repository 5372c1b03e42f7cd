"""The default allocator: a game on the deployed policy, a pairwise surrogate, evaluation in loop.

1. Screen. Evaluate random coalitions of the ladder game in antithetic pairs (each a
   deployable policy) and random policies on the budget frontier.
2. Credit. Fit the pairwise surrogate (`engine.model`) to every evaluated policy; its ladder
   Shapley values (closed form, bootstrap errors) are the credit, its deficit-pair
   coefficients the interactions, its K-fold R^2 how far to trust it.
3. Loop. Solve the surrogate's allocation exactly under every limit (the best policy not yet
   evaluated), plus the K-1 best inside a trust region around the incumbent (at most r units
   changed; r doubles after an improvement and halves after a miss, as TuRBO), evaluate
   them, refit, and repeat until the evaluation budget is spent or the best has not improved
   for `patience` rounds.
4. Return the best *evaluated* feasible policy: never worse than anything it looked at.

The allocator sees the model only through `evaluate(choices) -> values` (higher is better),
so CNNs and transformers share it. Its state is a JSON-able dict, saved after every round,
so a killed search resumes where it stopped and reaches the same policy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from smpq.engine.model import QuadraticModel, bootstrap_shapley, fit_model
from smpq.engine.solve import quadratic_topk, quadratic_value
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text, read_json
from smpq.strategy import MAX_EVALUATIONS

__all__ = ["EngineConfig", "EngineResult", "min_evaluations", "run_engine"]

Evaluate = Callable[[np.ndarray], np.ndarray]
STATE_VERSION = 1
STATE_MAX_BYTES = 256 * 2**20  # a resume state: one row per evaluated policy


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the allocator; `evaluations` is the budget of value evaluations."""

    evaluations: int = 300
    screen_fraction: float = 0.3
    frontier_share: float = 0.5
    top_k: int = 4
    patience: int = 20
    bootstrap: int = 20
    seed: int = 0
    time_limit: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.evaluations <= MAX_EVALUATIONS:
            raise SmpqError(f"evaluations must be in 1..{MAX_EVALUATIONS}, got "
                            f"{self.evaluations}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise SmpqError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0 < self.screen_fraction < 1:
            raise SmpqError("screen_fraction must be in (0, 1)")
        if not 0 <= self.frontier_share <= 1:
            raise SmpqError("frontier_share must be in [0, 1]")
        if self.patience < 1 or self.bootstrap < 0:
            raise SmpqError("patience must be >= 1 and bootstrap >= 0")


def min_evaluations(space: PolicySpace, config: EngineConfig) -> int:
    """The fewest evaluations one screening plus one loop round needs."""
    return 4 + config.top_k


@dataclass
class EngineResult:
    """The best evaluated policy and everything the report shows."""

    choice: tuple[int, ...]
    value: float
    evaluations: int
    seconds: float
    rounds: list[dict] = field(default_factory=list)
    history: list[float] = field(default_factory=list)  # best feasible value after each eval
    shapley: list[float] = field(default_factory=list)
    shapley_se: list[float] = field(default_factory=list)
    interactions: list[dict] = field(default_factory=list)
    interaction_matrix: dict = field(default_factory=dict)
    r2_cv: float = float("nan")
    stopped: str = "budget"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _State:
    """Evaluated policies in order, round log, and where the run is."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint
        self.choices: list[tuple[int, ...]] = []
        self.values: list[float] = []
        self.rounds: list[dict] = []
        self.screened = False
        self.stale = 0
        self.radius = 1
        self.hyper: dict | None = None  # the surrogate's penalty/interaction weight, and when
        self.seconds = 0.0

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                "choices": [list(c) for c in self.choices], "values": self.values,
                "rounds": self.rounds, "screened": self.screened, "stale": self.stale,
                "radius": self.radius, "hyper": self.hyper, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: Mapping, fingerprint: dict) -> _State:
        if data.get("version") != STATE_VERSION or data.get("fingerprint") != fingerprint:
            raise SmpqError("the checkpoint belongs to another search (space, budget or "
                            "settings differ); use a fresh --out or drop --resume")
        st = cls(fingerprint)
        st.choices = [tuple(int(x) for x in c) for c in data["choices"]]
        st.values = [float(v) for v in data["values"]]
        st.rounds = list(data["rounds"])
        st.screened = bool(data["screened"])
        st.stale = int(data["stale"])
        st.radius = int(data["radius"])
        st.hyper = data["hyper"]
        st.seconds = float(data["seconds"])
        return st


def _fingerprint(space: PolicySpace, config: EngineConfig,
                 prior: np.ndarray | None = None) -> dict:
    costs = {m: [np.asarray(r, float).round(9).tolist() for r in rows]
             for m, rows in sorted(space.costs.items())}
    extra = {} if prior is None else {"prior": hashlib.sha256(json.dumps(
        np.asarray(prior, float).round(12).tolist()).encode()).hexdigest()[:16]}
    return {**extra, "units": list(space.units), "grids": [list(g) for g in space.grids],
            "limits": {m: float(v) for m, v in sorted(space.limits.items())},
            "costs": hashlib.sha256(json.dumps(costs).encode()).hexdigest()[:16],
            "config": {k: v for k, v in asdict(config).items() if k != "evaluations"}}


def _best(space: PolicySpace, st: _State) -> tuple[tuple[int, ...] | None, float]:
    if not st.choices:
        return None, -math.inf
    ok = space.fits(np.array(st.choices))
    best, val = None, -math.inf
    for c, v, f in zip(st.choices, st.values, ok, strict=True):
        if f and v > val:
            best, val = c, v
    return best, val


MAX_REGION = 20_000  # trust regions up to this many policies are enumerated, not solved


def _region(space: PolicySpace, centre: tuple[int, ...], r: int) -> np.ndarray | None:
    """Every policy that changes at most r units of `centre` (None past MAX_REGION)."""
    sizes = [space.n_choices(u) for u in range(space.n_units)]
    count = 0
    for j in range(1, r + 1):
        count += sum(math.prod(s - 1 for s in units)
                     for units in itertools.combinations(sizes, j))
        if count > MAX_REGION:
            return None
    rows = [np.array(centre, dtype=np.int64)]
    for j in range(1, r + 1):
        for units in itertools.combinations(range(space.n_units), j):
            alts = [[c for c in range(sizes[u]) if c != centre[u]] for u in units]
            for combo in itertools.product(*alts):
                row = np.array(centre, dtype=np.int64)
                row[list(units)] = combo
                rows.append(row)
    return np.stack(rows)


def _region_topk(space: PolicySpace, model: QuadraticModel, centre: tuple[int, ...], r: int,
                 k: int, skip: set) -> list[tuple[int, ...]] | None:
    """The k best-predicted feasible policies within r units of `centre` not in `skip`, by
    enumeration: the same answer as the region-restricted MILP (ties aside), far cheaper
    for small regions; None when the region is too large to enumerate."""
    cand = _region(space, centre, r)
    if cand is None:
        return None
    cand = cand[space.fits(cand)]
    keep = [i for i, c in enumerate(map(tuple, cand.tolist())) if c not in skip]
    if not keep:
        return []
    cand = cand[keep]
    order = np.argsort(-model.predict(space, cand), kind="stable")[:k]
    return [tuple(int(x) for x in cand[i]) for i in order]


def _local_picks(space: PolicySpace, model: QuadraticModel, linear: list, quad: dict,
                 centre: tuple[int, ...], r: int, k: int, skip: list,
                 time_limit: float) -> list[tuple[int, ...]]:
    """The k best-predicted new policies within r units of `centre`: enumerated when the
    region is small, else the MILP restricted to it."""
    found = _region_topk(space, model, centre, r, k, set(skip))
    if found is None:
        found = quadratic_topk(space, linear, quad, k=k, exclude=skip, time_limit=time_limit,
                               near=(centre, r))
    return found


def _promising(space: PolicySpace, model: QuadraticModel, best: tuple[int, ...],
               picks: list[tuple[int, ...]]) -> bool:
    """Whether any pick is predicted better than the best policy itself."""
    pred = model.predict(space, np.array([best, *picks]))
    return bool(np.any(pred[1:] > pred[0] + 1e-12 * (1.0 + abs(pred[0]))))


RESELECT = 1.25  # choose the surrogate's hyper-parameters again once the data grew this much
PRIOR_SCREEN = 2  # random screening policies when a prior feature is given (plus `initial`)


def _fit(space: PolicySpace, st: _State, cfg: EngineConfig,
         prior: np.ndarray | None = None) -> QuadraticModel:
    """The surrogate on every evaluated policy. Cross-validated model selection (the costly
    part) runs when the data has grown by RESELECT since the last one; in between the chosen
    penalty and interaction weight are reused. The schedule depends only on the data, so a
    resumed run fits exactly the same models."""
    x, y = np.array(st.choices), np.array(st.values)
    if st.hyper is None or len(y) >= RESELECT * st.hyper["n"]:
        model = fit_model(space, x, y, seed=cfg.seed, prior=prior)
        st.hyper = {"n": len(y), "lam": model.lam, "pair_scale": model.pair_scale,
                    "r2_cv": model.r2_cv}
        return model
    model = fit_model(space, x, y, seed=cfg.seed, lam=st.hyper["lam"],
                      pair_scale=st.hyper["pair_scale"], prior=prior)
    return replace(model, r2_cv=st.hyper["r2_cv"])


def run_engine(space: PolicySpace, evaluate: Evaluate, config: EngineConfig | None = None, *,
               checkpoint: str | Path | None = None, resume: bool = False,
               progress: Callable[[int, int, float], None] | None = None,
               initial: np.ndarray | None = None,
               prior: np.ndarray | None = None) -> EngineResult:
    """Search `space` with at most `config.evaluations` calls' worth of policies.

    `initial`: policies to evaluate first (e.g. what cheap scores allocate, the best uniform
    policy); they count against the budget, and infeasible ones are skipped. `prior`: one
    expected gain per step (`space.players` order), a feature of the surrogate
    (`smpq.engine.model`)."""
    cfg = config or EngineConfig()
    space.check_feasible()
    need = min_evaluations(space, cfg)
    if cfg.evaluations < need:
        raise SmpqError(f"an evaluation budget of {cfg.evaluations} is below the {need} one "
                        f"screening and one round need")
    fp = _fingerprint(space, cfg, prior)
    path = Path(checkpoint) if checkpoint is not None else None
    st = _State(fp)
    if resume and path is not None and path.exists():
        try:
            st = _State.from_dict(read_json(path, "search state", STATE_MAX_BYTES), fp)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SmpqError(f"cannot resume from {path}: {e}") from None
    start = time.perf_counter() - st.seconds
    seen = set(st.choices)

    def spend(batch: np.ndarray) -> np.ndarray:
        fresh = []
        for c in np.atleast_2d(batch):
            t = tuple(int(x) for x in c)
            if t not in seen and len(st.choices) + len(fresh) < cfg.evaluations:
                fresh.append(t)
                seen.add(t)
        if not fresh:
            return np.zeros(0)
        vals = np.asarray(evaluate(np.array(fresh)), dtype=float)
        if vals.shape != (len(fresh),) or not np.all(np.isfinite(vals)):
            raise SmpqError("the value function returned non-finite or misshapen values")
        st.choices.extend(fresh)
        st.values.extend(float(v) for v in vals)
        if progress is not None:
            progress(len(st.choices), cfg.evaluations, _best(space, st)[1])
        return vals

    def save() -> None:
        st.seconds = time.perf_counter() - start
        if path is not None:
            atomic_write_text(path, json.dumps(st.to_dict()) + "\n")

    rng = np.random.default_rng([cfg.seed, len(st.choices), len(st.rounds)])
    if not st.screened:
        n_screen = max(need - cfg.top_k, int(cfg.screen_fraction * cfg.evaluations))
        if prior is not None:  # the prior already ranks policies: screen only enough to
            n_screen = PRIOR_SCREEN  # fit its scale, and spend the rest where it points
        n_front = int(round(cfg.frontier_share * n_screen))
        batch = [space.random_maximal(rng, n_front), space.random_ladder(rng, n_screen - n_front)]
        if initial is not None and len(initial):
            first = np.atleast_2d(np.asarray(initial, dtype=np.int64))
            batch.insert(0, first[space.fits(first)])
        spend(np.concatenate(batch))
        st.screened = True
        save()

    model: QuadraticModel | None = None
    stopped = "budget"
    while len(st.choices) < cfg.evaluations:
        model = _fit(space, st, cfg, prior)
        linear, quad = model.choice_tables(space)
        room = cfg.evaluations - len(st.choices)
        best_before, val_before = _best(space, st)
        want = min(cfg.top_k, room)
        picks = quadratic_topk(space, linear, quad, k=1, exclude=st.choices,
                               time_limit=cfg.time_limit)
        local: list[tuple[int, ...]] = []
        if best_before is not None and want > len(picks):
            k, skip = want - len(picks), [*st.choices, *picks]
            while not local and st.radius <= space.n_units:
                local = _local_picks(space, model, linear, quad, best_before, st.radius, k,
                                     skip, cfg.time_limit)
                if not local:  # the region is used up: widen it
                    st.radius += 1
            if local and st.radius == 1 and space.n_units > 1 and not _promising(
                    space, model, best_before, local):
                # on the budget frontier one-unit changes can only step down: trade two
                local = _local_picks(space, model, linear, quad, best_before, 2, k, skip,
                                     cfg.time_limit) or local
        picks += local
        if not picks:
            stopped = "exhausted"
            break
        pred = quadratic_value(linear, quad, np.array(picks)) + model.intercept
        got = spend(np.array(picks))
        _, val_after = _best(space, st)
        st.stale = 0 if val_after > val_before else st.stale + 1
        # the trust region: wider after a success, narrower after a miss (TuRBO-style)
        st.radius = (min(2 * st.radius, space.n_units) if val_after > val_before
                     else max(1, st.radius // 2))
        st.rounds.append({"round": len(st.rounds) + 1, "evaluations": len(st.choices),
                          "predicted": [float(p) for p in pred[:len(got)]],
                          "measured": [float(v) for v in got],
                          "best": float(val_after), "r2_cv": float(model.r2_cv),
                          "lambda": model.lam, "pair_scale": model.pair_scale})
        save()
        if st.stale >= cfg.patience:
            stopped = "stable"
            break

    if model is None or model.n_fit != len(st.choices):
        model = fit_model(space, np.array(st.choices), np.array(st.values), seed=cfg.seed,
                          prior=prior)
    best, val = _best(space, st)
    if best is None:
        raise SmpqError("no evaluated policy meets the budget")
    se = bootstrap_shapley(space, np.array(st.choices), np.array(st.values), model,
                           n_boot=cfg.bootstrap, seed=cfg.seed, prior=prior)
    history, run = [], -math.inf
    ok = space.fits(np.array(st.choices))
    for v, f in zip(st.values, ok, strict=True):
        run = max(run, v) if f else run
        history.append(run)
    save()
    return EngineResult(best, val, len(st.choices), time.perf_counter() - start, st.rounds,
                        history, model.shapley(space).tolist(), se.tolist(),
                        model.top_interactions(space), model.interaction_matrix(space),
                        float(model.r2_cv), stopped)
