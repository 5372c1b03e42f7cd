"""Shapley allocation of weight formats for post-training quantization (a progressive game).

Units are share groups (`share_groups`: fused q/k/v and gate/up decide one format together);
candidates c_0 < ... < c_{K-1} are weight QuantSpecs ordered by weight bits (ties keep the
given order). Candidate weights (each (layer, candidate) quantized ONCE by the backend and
cached by content key under `<cache_dir>/candidates/`, shared by all runs) live in
`smpq.transformer.scores`, shared with the baselines, and are re-exported here.

The game, our reading of CoopQ's progressive game (Zhao et al. 2025) extended to K formats:

    players        (g, k) for every group g and level k = 1 .. K-1
    level_g(S)     max {k : (g, k) in S}, and 0 when g has no player in S (highest wins)
    v(S)           -KL(float || model with every group g at c_{level_g(S)}) on fixed
                   calibration blocks (encoders: minus the mean embedding cosine distance)

v(N) is every group at the top format and v(empty) every group at the lowest; no layer ever
disappears (CoopQ: pruning games make the model collapse and the estimates noisy). Choice
scores for the MILP are the additive prediction of v:

    score(g, k) = sum_{j <= k} phi(g, j)     (0 for k = 0)

so v(empty) + sum_g score(g, level_g) predicts v of a policy and equals v(N) at the top.

Orderings. Averaged over ALL orderings (ladder=False, the literal game) a player moves v only
while it is its group's top player, and removing (g, K-1) first can drop g straight to c_0.
Intermediate scores then come out biased low: one isolated group with step gains a, b, c
(c_0->c_1->c_2->c_3) gets phi = (a/3, a/3 + b/2, a/3 + b/2 + c), so score(c_1) = a/3 instead
of a, and the MILP is pushed toward extremes (c_0 plus c_3) over the middle formats. The
default, ladder=True, averages only over orderings in which each group's players leave
top-down (the Shapley value under precedence constraints, Faigle & Kern 1992): every removal
lowers one group by exactly one step, phi(g, k) is the expected gain of the step c_{k-1} -> c_k
over random coalitions of the other groups, and score(g, k) is exact for additive games.
Sampling: the engine's uniform permutations, relabelled so each group leaves top-down (a
uniform draw under the constraints); the game reads a level as the count of present players.

Estimation: permutation sampling of `smpq.shapley` with antithetic pairs, an adaptive stop once
every 95% CI half-width is below `tolerance * |v(N) - v(empty)|`, and a cap on mask
evaluations (an upper bound on forward passes: assignments are memoised; in the literal game
removing a non-top player needs none). Every permutation is checkpointed to a JSON state file.

Pairwise step (interactions=True): Sigma = covariance of the per-permutation marginals,
K = (Sigma + diag Sigma) / 2 (shrunk halfway to its diagonal, as CoopQ). We read CoopQ's
a'q + q'Kq as a mean-variance objective over player indicators q (q_{g,k} = [level_g >= k]):
maximise phi'q - lambda q'Kq, lambda = risk / sqrt(mean diag K) so that `risk` is unitless
(penalty per player ~ risk x its marginal std; `pairwise_lambda`), solved exactly by
`smpq.alloc.allocate_quadratic` (gains phi, matrix K). The additive scores go to
`smpq.alloc.allocate_milp`; this module keeps the game and its scores, not the allocator.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from smpq.cost import ModelCost
from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text, read_json
from smpq.policy import Policy
from smpq.shapley import (
    Z95,
    SamplerState,
    ShapleyConfig,
    ShapleyResult,
    intervals,
    permutation_shapley,
)
from smpq.spec import LayerChoice, QuantSpec
from smpq.transformer.scores import (
    DEFAULT_CANDIDATES,
    Candidates,
    build_candidates,
    parse_candidates,
    spec_key,
)

__all__ = [
    "DEFAULT_CANDIDATES", "STATE_VERSION", "Candidates", "MixedConfig", "ProgressiveGame",
    "build_candidates", "choice_policy", "choice_scores", "estimate_contributions",
    "group_costs", "interaction_matrix", "pairwise_lambda", "pairwise_value",
    "parse_candidates", "spec_key",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- the game


class ProgressiveGame:
    """Batched value function over player masks; v is memoised per group-level assignment.

    ladder=True reads a mask's level as the COUNT of the group's players present: under the
    orderings `estimate_contributions` credits (a group's players leave top-down) that equals
    the max rule, and it makes every removal a one-step downgrade. ladder=False: max rule."""

    def __init__(self, n_groups: int, n_levels: int,
                 evaluate: Callable[[tuple[int, ...]], float], ladder: bool = True,
                 batch: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if n_groups < 1 or n_levels < 2:
            raise SmpqError("a progressive game needs >= 1 group and >= 2 candidate formats")
        self.n_groups, self.n_levels, self.evaluate = n_groups, n_levels, evaluate
        self.ladder = ladder
        self.batch = batch  # rows of levels -> values (an smpq.evaluator.Evaluator): the
        # assignments a call still needs go there together, e.g. to Ray workers
        self.players = [(g, k) for g in range(n_groups) for k in range(1, n_levels)]
        self._group = np.array([g for g, _ in self.players])
        self._level = np.array([k for _, k in self.players])
        self.memo: dict[tuple[int, ...], float] = {}
        self.forward_passes = 0

    @property
    def n_players(self) -> int:
        return len(self.players)

    def levels(self, mask: np.ndarray) -> tuple[int, ...]:
        if self.ladder:
            return tuple(int(x) for x in np.bincount(self._group[mask], minlength=self.n_groups))
        lv = np.zeros(self.n_groups, dtype=np.int64)
        np.maximum.at(lv, self._group[mask], self._level[mask])
        return tuple(int(x) for x in lv)

    def value(self, levels: Sequence[int]) -> float:
        key = tuple(int(x) for x in levels)
        if key not in self.memo:
            self.memo[key] = float(self.evaluate(key))
            self.forward_passes += 1
        return self.memo[key]

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        keys = [self.levels(np.asarray(m, dtype=bool)) for m in masks]
        if self.batch is not None:
            missing = list(dict.fromkeys(k for k in keys if k not in self.memo))
            if missing:
                values = self.batch(np.array(missing, dtype=np.int64))
                self.memo.update(zip(missing, (float(v) for v in values), strict=True))
                self.forward_passes += len(missing)
        return np.array([self.value(k) for k in keys])

    def memo_to_dict(self) -> dict[str, float]:
        return {",".join(map(str, k)): v for k, v in self.memo.items()}

    def memo_from_dict(self, data: Mapping[str, float]) -> None:
        self.memo.update({tuple(int(x) for x in k.split(",")): float(v) for k, v in data.items()})


@dataclass(frozen=True)
class MixedConfig:
    """Shapley estimation and allocation settings. `tolerance` is relative to |v(N)-v(empty)|;
    `max_evaluations` caps mask evaluations (>= forward passes); `interactions` makes
    run_ptq's "shapley" allocate pairwise (as "shapley_pairwise"), with `shrinkage` toward the
    diagonal and `risk` (unitless) weighing q'Kq (see `pairwise_lambda`)."""

    permutations: int = 32
    antithetic: bool = True
    tolerance: float | None = 0.005
    min_permutations: int = 8
    max_evaluations: int | None = None
    seed: int = 0
    interactions: bool = False
    shrinkage: float = 0.5
    risk: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrinkage <= 1.0:
            raise SmpqError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if not (math.isfinite(self.risk) and self.risk >= 0):
            raise SmpqError(f"risk must be a finite number >= 0, got {self.risk}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SmpqError(f"seed must be an int >= 0 (the ladder replays it), got {self.seed!r}")
        self.shapley(1.0)  # validates the rest through ShapleyConfig

    def shapley(self, span: float) -> ShapleyConfig:
        tol = self.tolerance * span if self.tolerance is not None and span > 0 else None
        return ShapleyConfig(permutations=self.permutations, antithetic=self.antithetic,
                             tolerance=tol, min_permutations=self.min_permutations,
                             max_evaluations=self.max_evaluations, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_state(path: Path, fingerprint: Mapping[str, Any]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = read_json(path, "Shapley state", 256 * 2**20)
    except SmpqError as exc:
        raise SmpqError(f"unreadable {exc}") from None
    same = json.loads(json.dumps(dict(fingerprint)))
    if (not isinstance(data, dict) or data.get("version") != STATE_VERSION
            or data.get("fingerprint") != same):
        raise SmpqError(f"{path} belongs to a different run (model, data, candidates or "
                        "settings changed); delete it or run without resume")
    return data


def _ladder_rows(rows: np.ndarray, game: ProgressiveGame, seed: int, antithetic: bool,
                 seen: Mapping[str, float] | None) -> np.ndarray:
    """Re-credit each sampled marginal to the step it was: replay the engine's permutations
    (seeded, pairs reversed when antithetic) and give the drop caused by g's r-th removal to
    player (g, K-r). A uniform permutation, relabelled so that each group's players leave
    top-down, is a uniform ordering under those precedence constraints. Replayed removal
    chains are checked against the engine's coalition cache, so a drift cannot go unseen."""
    if not game.ladder or not len(rows):
        return rows
    rng, lv, n = np.random.default_rng(seed), game.n_levels - 1, game.n_players
    out = np.empty_like(rows)
    i = 0
    while i < len(rows):
        perm = rng.permutation(n)
        for p in [perm, perm[::-1]] if antithetic else [perm]:
            count = np.full(game.n_groups, lv)
            alive = np.ones(n, dtype=bool)
            for t, player in enumerate(p):
                g = game._group[player]
                out[i, g * lv + count[g] - 1] = rows[i, player]
                count[g] -= 1
                alive[player] = False
                if seen is not None and t in (0, n // 2) and \
                        alive.astype(np.uint8).tobytes().translate(_BITS).decode() not in seen:
                    raise SmpqError("cannot replay the Shapley sampler's permutations (the "
                                    "engine's sampling changed); use ladder=False")
            i += 1
    return out


_BITS = bytes.maketrans(b"\x00\x01", b"01")


def _summary(rows: np.ndarray, antithetic: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, stderr) with antithetic pairs averaged into one sample, as smpq.shapley does."""
    samples = rows.reshape(-1, 2, rows.shape[1]).mean(1) if antithetic else rows
    m = samples.shape[0]
    se = samples.std(axis=0, ddof=1) / math.sqrt(m) if m > 1 else np.full(rows.shape[1], np.nan)
    return rows.mean(axis=0), se


class _Converged(Exception):
    def __init__(self, state: SamplerState) -> None:
        self.state = state


def estimate_contributions(
    game: ProgressiveGame, config: MixedConfig = MixedConfig(), *,
    state_path: str | Path | None = None, resume: bool = False,
    fingerprint: Mapping[str, Any] | None = None, progress: Progress | None = None,
) -> ShapleyResult:
    """Shapley values of the game's players; resumable from `state_path` (same fingerprint).

    With game.ladder the engine's marginals are re-credited by `_ladder_rows`; the adaptive
    stop is judged here, on the re-credited marginals, after each permutation (pair)."""
    sampling = {k: v for k, v in config.to_dict().items()
                if k not in ("interactions", "shrinkage", "risk")}  # allocation-only settings
    fp = {"config": sampling, "ladder": game.ladder, **dict(fingerprint or {})}
    path = Path(state_path) if state_path is not None else None
    saved = _read_state(path, fp) if path is not None and resume else None
    state = None
    if saved is not None:
        game.memo_from_dict(saved.get("assignments", {}))
        state = SamplerState.from_dict(saved["sampler"])
    top, bottom = (game.n_levels - 1,) * game.n_groups, (0,) * game.n_groups
    span = abs(game.value(top) - game.value(bottom))
    engine = replace(config.shapley(span), tolerance=None)
    if game.batch is not None:  # workers: send whole (antithetic) chains, not 64-mask slices
        engine = replace(engine, batch_size=2 * (game.n_players + 1))
    tol = config.shapley(span).tolerance

    def remap(st: SamplerState) -> np.ndarray:
        return _ladder_rows(np.asarray(st.marginals, float), game, config.seed,
                            config.antithetic, st.cache)

    def converged(st: SamplerState) -> bool:
        rows = remap(st)
        if tol is None or len(rows) < config.min_permutations:
            return False
        return bool(np.all(Z95 * _summary(rows, config.antithetic)[1] < tol))

    def checkpoint(st: SamplerState) -> None:
        if path is not None:
            data = {"version": STATE_VERSION, "fingerprint": fp, "sampler": st.to_dict(),
                    "assignments": game.memo_to_dict()}
            atomic_write_text(path, json.dumps(data) + "\n")
        if converged(st):
            raise _Converged(st)

    def tick(done: int, total: int) -> None:
        if progress:
            progress("shapley", done, total)

    stop = "permutations"
    try:
        if state is not None and converged(state):
            raise _Converged(state)
        result = permutation_shapley(game, game.n_players, engine, state=state, progress=tick,
                                     checkpoint=checkpoint)
        stop = result.stop_reason
    except _Converged as done:
        stop = "tolerance"
        rows = len(done.state.marginals)
        result = permutation_shapley(game, game.n_players, replace(engine, permutations=rows),
                                     state=done.state)
    rows = remap(result.state)
    mean, se = _summary(rows, config.antithetic)
    low, high = intervals(rows, config.antithetic)  # the engine's t quantile and variance floor
    return replace(result, estimate=mean, stderr=se, ci_low=low, ci_high=high, marginals=rows,
                   stop_reason=stop)


def choice_scores(estimate: np.ndarray, n_groups: int, n_levels: int) -> list[np.ndarray]:
    """score(g, k) = sum_{j<=k} phi(g, j), 0 at the lowest format: the additive prediction."""
    phi = np.asarray(estimate, dtype=float).reshape(n_groups, n_levels - 1)
    return [np.concatenate([[0.0], np.cumsum(row)]) for row in phi]


def pairwise_lambda(k_matrix: np.ndarray, risk: float) -> float:
    """lambda = risk / sqrt(mean diag K): the q'Kq weight in value units from a unitless risk."""
    scale = math.sqrt(max(float(np.mean(np.diag(k_matrix))), 0.0))
    return risk / scale if scale > 0 else 0.0


def interaction_matrix(result: ShapleyResult, shrinkage: float = 0.5) -> np.ndarray:
    """Covariance of per-permutation marginals, shrunk toward its diagonal by `shrinkage`."""
    m = result.marginals
    if m.shape[0] < 2:
        raise SmpqError("interactions need at least two sampled permutations")
    sigma = np.atleast_2d(np.cov(m, rowvar=False))
    return (1 - shrinkage) * sigma + shrinkage * np.diag(np.diag(sigma))


# ----------------------------------------------------------------------------- units


def group_costs(cost: ModelCost, groups: Sequence[Sequence[str]],
                specs: Sequence[QuantSpec]) -> dict[str, list[np.ndarray]]:
    """Per metric, per group, per candidate: the sum of its members' costs (weight-only)."""
    out: dict[str, list[np.ndarray]] = {}
    for group in groups:
        rows = [cost.choice_costs(n, [LayerChoice(s, None) for s in specs]) for n in group]
        for metric in rows[0]:
            out.setdefault(metric, []).append(np.sum([r[metric] for r in rows], axis=0))
    return out


def choice_policy(groups: Sequence[Sequence[str]], specs: Sequence[QuantSpec],
                  choice: Sequence[int], meta: Mapping | None = None) -> Policy:
    """A weight-only Policy: every member of group g gets specs[choice[g]]."""
    return Policy({n: LayerChoice(specs[k], None) for g, k in zip(groups, choice, strict=True)
                   for n in g}, meta=dict(meta or {}))


def pairwise_value(choice: Sequence[int], phi: np.ndarray, k_matrix: np.ndarray,
                   n_levels: int, risk: float) -> float:
    """phi'q - risk q'Kq of a choice, q_{g,k} = [choice_g >= k]: the pairwise objective (what
    `smpq.alloc.allocate_quadratic(phi, K, ..., risk)` maximises), for reports and tests."""
    q = np.array([float(c >= k) for c in choice for k in range(1, n_levels)])
    return float(phi @ q - risk * q @ k_matrix @ q)
