"""From per-candidate scores to a policy: argmax per layer, or exact allocation under a budget.

A layer's choice is a (weight candidate, activation candidate) pair; its score is the sum of
the two candidates' scores (contributions are additive over players), and its costs are the
cost model's per-layer terms. The budgeted derivation is the multiple-choice knapsack solved
exactly by `smpq.alloc.allocate_milp`, on the budget resolved once (`resolve_budget`).

A finished search serves other budgets: `rederive(run_dir, budget)` reads what `smpq search`
saved (policy.json with the search config, contributions.json, cost.json) and solves the same
exact derivation at the new budget, without searching again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smpq.alloc import Allocation, allocate_milp
from smpq.cost import Budget, ModelCost, ResolvedBudget
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec, act_spec, weight_spec

__all__ = ["COST_FILE", "Derivation", "SavedSearch", "argmax_within_budget", "derive_argmax",
           "derive_budgeted", "load_search", "pair_scores", "rederive", "resolve_budget"]

COST_FILE = "cost.json"  # the run's ModelCost, written by `smpq search` beside policy.json


@dataclass(frozen=True)
class Derivation:
    policy: Policy
    allocation: Allocation | None
    repaired: bool = False  # argmax broke the budget and was replaced by the exact allocation

    def summary(self) -> dict:
        a = self.allocation
        return {
            "repaired": self.repaired,
            "binding": list(a.binding) if a else [],
            "tight": list(a.tight) if a else [],
            "solver_seconds": a.seconds if a else 0.0,
        }


def pair_scores(w_scores: np.ndarray, a_scores: np.ndarray) -> np.ndarray:
    """Score of every (w, a) pair, flattened w-major: s_w[i] + s_a[j]."""
    return (np.asarray(w_scores)[:, None] + np.asarray(a_scores)[None, :]).ravel()


def _pairs(w_specs: Sequence[QuantSpec], a_specs: Sequence[QuantSpec]) -> list[LayerChoice]:
    return [LayerChoice(w, a) for w in w_specs for a in a_specs]


def _full_policy(order: Sequence[str], searched: Mapping[str, LayerChoice],
                 fixed: Mapping[str, LayerChoice | None]) -> Policy:
    return Policy({n: searched[n] if n in searched else fixed.get(n) for n in order})


def derive_argmax(
    order: Sequence[str],
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    fixed: Mapping[str, LayerChoice | None],
) -> Policy:
    """Per layer the weight and activation candidates with the largest score (EdMIPS)."""
    chosen = {
        n: LayerChoice(w_specs[int(np.argmax(sw))], a_specs[int(np.argmax(sa))])
        for n, (sw, sa) in scores.items()
    }
    return _full_policy(order, chosen, fixed)


def derive_budgeted(
    cost: ModelCost,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    budget: Budget,
    fixed: Mapping[str, LayerChoice | None],
    pinned_reference: Mapping[str, LayerChoice | None] | None = None,
    *,
    resolved: ResolvedBudget | None = None,
) -> Derivation:
    """Maximise the total score of the searched layers subject to every budget constraint.

    Fixed layers keep their choice; their cost is moved to the right-hand side. `resolved`
    (from `resolve_budget`) skips resolving the budget again.
    """
    pairs = _pairs(w_specs, a_specs)
    names = list(scores)
    if resolved is None:
        resolved = resolve_budget(cost, names, w_specs, a_specs, budget, fixed, pinned_reference)
    limits = resolved.unit_limits
    layer_scores = [pair_scores(*scores[n]) for n in names]
    costs = {m: [cost.choice_costs(n, pairs)[m] for n in names] for m in limits}
    alloc = allocate_milp(layer_scores, costs, limits, scales=resolved.scales)
    chosen = {n: pairs[k] for n, k in zip(names, alloc.choice, strict=True)}
    return Derivation(_full_policy(cost.names, chosen, fixed), alloc)


def resolve_budget(
    cost: ModelCost,
    names: Sequence[str],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    budget: Budget,
    fixed: Mapping[str, LayerChoice | None],
    pinned_reference: Mapping[str, LayerChoice | None] | None = None,
) -> ResolvedBudget:
    """The budget over the searched layers `names` (every candidate pair) and the fixed rest."""
    pairs = _pairs(w_specs, a_specs)
    rest = {n: c for n, c in fixed.items() if n not in names}
    return budget.resolve(cost, {n: pairs for n in names}, pinned_reference, rest)


def argmax_within_budget(
    cost: ModelCost,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    w_specs: Sequence[QuantSpec],
    a_specs: Sequence[QuantSpec],
    budget: Budget,
    fixed: Mapping[str, LayerChoice | None],
    pinned_reference: Mapping[str, LayerChoice | None] | None = None,
) -> Derivation:
    """EdMIPS derivation; if the argmax policy breaks the budget, fall back to the exact one."""
    resolved = resolve_budget(cost, list(scores), w_specs, a_specs, budget, fixed,
                              pinned_reference)
    pol = derive_argmax(cost.names, scores, w_specs, a_specs, fixed)
    if resolved.fits(cost, pol):
        return Derivation(pol, None)
    d = derive_budgeted(cost, scores, w_specs, a_specs, budget, fixed, pinned_reference,
                        resolved=resolved)
    return Derivation(d.policy, d.allocation, repaired=True)


# -- re-deriving a finished search ------------------------------------------------------------

@dataclass(frozen=True)
class SavedSearch:
    """What a finished search saved that a derivation at another budget needs.

    `scores` are the ones the run's exact derivation used: SMPQ's averaged Shapley estimates
    (the players' `ema`), or log softmax(alpha) for DMPQ and for SMPQ without search epochs.
    `fixed` are the layers that were not searched (pinned or float), at the run's choice.
    """

    cost: ModelCost
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    w_specs: list[QuantSpec]
    a_specs: list[QuantSpec]
    fixed: dict[str, LayerChoice | None]
    meta: dict = field(default_factory=dict)  # the run's policy meta: method, budget, search

    def derive(self, budget: Budget | str) -> Derivation:
        """The exact budgeted derivation at `budget`; SmpqError if it is infeasible."""
        budget = Budget.parse(budget) if isinstance(budget, str) else budget
        d = derive_budgeted(self.cost, self.scores, self.w_specs, self.a_specs, budget,
                            self.fixed, self.fixed)
        meta = {k: self.meta[k] for k in ("method", "search") if k in self.meta}
        policy = Policy(d.policy.layers, meta={**meta, "budget": str(budget),
                                               "searched_at": self.meta.get("budget"),
                                               **d.summary()})
        return Derivation(policy, d.allocation)

    def check(self, budget: Budget, policy: Policy) -> list[dict]:
        """`Budget.check` with the run's unsearched layers as the pinned ones."""
        return budget.check(self.cost, policy, self.fixed)


def rederive(run_dir: str | os.PathLike, budget: Budget | str) -> Policy:
    """The policy a finished search (`smpq search --out run_dir`) derives at `budget`.

    Always the exact budgeted derivation (as `--derive milp`), so a run searched with
    `--derive argmax` re-derived at its own budget may differ from its policy.json."""
    return load_search(run_dir).derive(budget).policy


def load_search(run_dir: str | os.PathLike) -> SavedSearch:
    """Read a search output folder; SmpqError (one line) when it is not one or is malformed."""
    from smpq.cnn.search.supernet_search import SearchConfig  # it imports this module

    run = Path(run_dir)
    if not run.is_dir():
        raise SmpqError(f"no search output at {run}: not a folder")
    for name in ("policy.json", "contributions.json", COST_FILE):
        if not (run / name).is_file():
            raise SmpqError(f"{run} is not a search output (from `smpq search`): no {name}")
    policy = Policy.load(run / "policy.json")
    if policy.meta.get("method") == "shapley-loop":
        raise SmpqError(f"{run} is a shapley-loop run: its policies were measured at its own "
                        "budget; run `smpq search` at the new budget (derive needs smpq/dmpq)")
    if not isinstance(policy.meta.get("search"), dict):
        raise SmpqError(f"{run}/policy.json has no search configuration: not a search output")
    cfg = SearchConfig.from_dict(policy.meta["search"])
    cost = ModelCost.from_dict(_read(run / COST_FILE))
    policy.validate(cost.names)
    contrib = _read(run / "contributions.json")
    layers = contrib.get("layers")
    if not isinstance(layers, dict) or not layers or not set(layers) <= set(cost.names):
        raise SmpqError(f"malformed {run}/contributions.json: 'layers' must name searched "
                        "layers of the model")
    for name, row in layers.items():
        if not isinstance(row, dict) or row.get("w_bits") != list(cfg.w_bits) or \
                row.get("a_bits") != list(cfg.a_bits):
            raise SmpqError(f"malformed {run}/contributions.json: layer {name!r} does not have "
                            "the search's candidate bits")
    players = contrib.get("players")
    if not isinstance(players, list):
        raise SmpqError(f"malformed {run}/contributions.json: 'players' must be a list")
    if cfg.method == "smpq" and players:
        scores = _ema_scores(players, layers, cfg.w_bits, cfg.a_bits, run)
    else:
        scores = {n: (_log_softmax(_vector(r.get("alpha_w"), len(cfg.w_bits), run, n)),
                      _log_softmax(_vector(r.get("alpha_a"), len(cfg.a_bits), run, n)))
                  for n, r in layers.items()}
    fixed = {n: policy.layers[n] for n in cost.names if n not in layers}
    return SavedSearch(cost, scores, [weight_spec(b) for b in cfg.w_bits],
                       [act_spec(b) for b in cfg.a_bits], fixed, dict(policy.meta))


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SmpqError(f"malformed {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise SmpqError(f"malformed {path}: expected a JSON object")
    return data


def _vector(values: object, n: int, run: Path, layer: str) -> np.ndarray:
    ok = isinstance(values, list) and len(values) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values)
    if not ok:
        raise SmpqError(f"malformed {run}/contributions.json: layer {layer!r} needs {n} "
                        "finite scores per kind")
    return np.asarray(values, dtype=float)


def _ema_scores(players: list, layers: Mapping, w_bits: Sequence[int], a_bits: Sequence[int],
                run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the players' averaged estimates in candidate order (weights, activations)."""
    ema: dict[tuple, object] = {}
    for p in players:
        if not isinstance(p, dict):
            raise SmpqError(f"malformed {run}/contributions.json: a player is not an object")
        ema[(p.get("layer"), p.get("kind"), p.get("bits"))] = p.get("ema")
    out = {}
    for name in layers:
        w = [ema.get((name, "w", b)) for b in w_bits]
        a = [ema.get((name, "a", b)) for b in a_bits]
        out[name] = (_vector(w, len(w_bits), run, name), _vector(a, len(a_bits), run, name))
    return out


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    m = a.max()
    return a - m - np.log(np.exp(a - m).sum())
