"""Shared plumbing of the baseline strategies: the search space, cost tables, one evaluator.

A policy over the searched layers is a tuple of *pair indices*, one per searched layer,
k = i * len(a_specs) + j for weight candidate i and activation candidate j (w-major, the
order of `derive.pair_scores`). Pinned layers keep their choice and are not part of it.

Every baseline that scores policies post-training goes through `PolicyEvaluator`: a copy of
the float model turned into a renormalised supernet (with one active branch per list it is
exactly the policy's fake-quantized model), calibrated once, and scored by `PolicyValue`
(a mask switch plus one forward pass over the validation tensors). Repeated policies are
memoised, so only distinct policies count as evaluations.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from smpq.alloc.problem import tolerance
from smpq.apply import calibrate_
from smpq.cnn.search.common import StrategyResult
from smpq.cnn.supernet import Supernet
from smpq.cnn.values import PolicyValue, stack_dataset
from smpq.cost import METRICS, Budget, ModelCost
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec

__all__ = [
    "Choice",
    "CostTables",
    "Meter",
    "PolicyEvaluator",
    "SearchCost",
    "SearchSpace",
    "cost_tables",
    "labelled_batches",
]

Choice = tuple[int, ...]


@dataclass(frozen=True)
class SearchSpace:
    """The searched layers, their candidate (weight, activation) pairs, and the pinned rest."""

    order: tuple[str, ...]  # every quantizable layer, in model order
    names: tuple[str, ...]  # the searched layers
    w_specs: tuple[QuantSpec, ...]
    a_specs: tuple[QuantSpec, ...]
    fixed: Mapping[str, LayerChoice | None] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        cost: ModelCost,
        w_specs: Sequence[QuantSpec],
        a_specs: Sequence[QuantSpec],
        fixed: Mapping[str, LayerChoice | None] | None,
    ) -> SearchSpace:
        fixed = dict(fixed or {})
        unknown = [n for n in fixed if n not in cost.layers]
        if unknown:
            raise SmpqError(f"pinned layer(s) not in the model: {', '.join(unknown)}")
        for kind, specs in (("weight", w_specs), ("activation", a_specs)):
            if not specs or len(set(specs)) != len(specs):
                raise SmpqError(f"{kind} candidates must be a non-empty list without repeats")
        names = tuple(n for n in cost.names if n not in fixed)
        if not names:
            raise SmpqError("every layer is pinned: there is nothing to search")
        return cls(tuple(cost.names), names, tuple(w_specs), tuple(a_specs), fixed)

    @property
    def pairs(self) -> list[LayerChoice]:
        return [LayerChoice(w, a) for w in self.w_specs for a in self.a_specs]

    @property
    def n_pairs(self) -> int:
        return len(self.w_specs) * len(self.a_specs)

    def pair(self, i: int, j: int) -> int:
        return i * len(self.a_specs) + j

    def split(self, k: int) -> tuple[int, int]:
        return divmod(int(k), len(self.a_specs))

    def policy(self, choice: Sequence[int], meta: Mapping | None = None) -> Policy:
        """The full policy (pinned layers included, model order) of a searched-layer choice."""
        pairs = self.pairs
        chosen = dict(zip(self.names, (pairs[int(k)] for k in choice), strict=True))
        layers = {n: chosen[n] if n in chosen else self.fixed.get(n) for n in self.order}
        return Policy(layers, meta=dict(meta or {}))

    def choice_of(self, policy: Policy) -> Choice:
        """Pair indices of a policy's searched layers (each must be a candidate pair)."""
        out = []
        for name in self.names:
            c = policy.layers.get(name)
            if c is None or c.weight not in self.w_specs or c.act not in self.a_specs:
                raise SmpqError(f"layer {name!r}: {c} is not a candidate pair of this search")
            out.append(self.pair(self.w_specs.index(c.weight), self.a_specs.index(c.act)))
        return tuple(out)

    def as_dict(self, choice: Sequence[int]) -> dict[str, tuple[int, int]]:
        """{layer: (weight index, activation index)}, what `PolicyValue` takes."""
        return {n: self.split(k) for n, k in zip(self.names, choice, strict=True)}


@dataclass(frozen=True)
class CostTables:
    """Every metric's cost of every pair on every searched layer, and the budget's limits.

    A policy's full metric is `costs[m][l, k_l]` summed over searched layers plus `offsets[m]`
    (pinned layers, and the constant part of size). `limits` holds the budget's full limits.
    """

    costs: dict[str, np.ndarray]  # metric -> (layers, pairs)
    offsets: dict[str, float]
    limits: dict[str, float]

    def totals(self, choices: np.ndarray) -> dict[str, np.ndarray]:
        """Full metric values of a batch of choices (n, layers) -> {metric: (n,)}."""
        choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        rows = np.arange(choices.shape[1])
        return {m: c[rows, choices].sum(axis=1) + self.offsets[m] for m, c in self.costs.items()}

    def feasible(self, choices: np.ndarray) -> np.ndarray:
        """Boolean mask of the choices that meet every limit (`smpq.alloc.fits`, as check)."""
        choices = np.atleast_2d(np.asarray(choices, dtype=np.int64))
        ok = np.ones(len(choices), dtype=bool)
        tot = self.totals(choices)
        for m, lim in self.limits.items():
            ok &= tot[m] <= lim + tolerance(lim)
        return ok

    def units(self) -> tuple[dict[str, list[np.ndarray]], dict[str, float], dict[str, float]]:
        """(costs, limits, scales) on the searched layers' sums, what `smpq.alloc` takes.

        The scales are the full limits, so a policy fits there exactly when it fits here."""
        costs = {m: list(self.costs[m]) for m in self.limits}
        limits = {m: lim - self.offsets[m] for m, lim in self.limits.items()}
        return costs, limits, {m: abs(lim) for m, lim in self.limits.items()}


def cost_tables(space: SearchSpace, cost: ModelCost, budget: Budget | None) -> CostTables:
    """Cost tables over the space; raises SmpqError when no policy can meet the budget."""
    pairs = space.pairs
    costs = {m: np.stack([cost.choice_costs(n, pairs)[m] for n in space.names]) for m in METRICS}
    offsets = dict.fromkeys(METRICS, 0.0)
    offsets["size"] = cost.constant_size
    for name, choice in space.fixed.items():
        for m, v in cost.choice_cost(name, choice).items():
            offsets[m] += v
    limits: dict[str, float] = {}
    if budget is not None:
        cands = {n: pairs for n in space.names}
        limits = budget.resolve(cost, cands, space.fixed, space.fixed).limits
    return CostTables(costs, offsets, limits)


def labelled_batches(
    dataset: Dataset, n_samples: int = 512, batch_size: int = 128, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """(inputs, labels) batches of the same random images `calibration_batches` draws."""
    if n_samples < 1 or batch_size < 1:
        raise SmpqError("n_samples and batch_size must be positive")
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(n_samples, n)]
    xs = torch.stack([dataset[int(i)][0] for i in idx])
    ys = torch.as_tensor(np.asarray([int(dataset[int(i)][1]) for i in idx]), dtype=torch.long)
    return list(zip(xs.split(batch_size), ys.split(batch_size), strict=True))


class PolicyEvaluator:
    """Post-training value of policies over a space, through one calibrated supernet.

    Values are memoised per (choice, metric); `calls` counts real forward passes over the
    validation set and `forward_seconds` the time spent in them.
    """

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        train_set: Dataset,
        val_set: Dataset,
        *,
        val_samples: int | None = None,
        calib: Sequence[Tensor] | None = None,
        seed: int = 0,
    ):
        from smpq.cnn.pipeline import calibration_batches  # downstream module: import where used

        self._float = model
        self._ref: Tensor | None = None
        work = copy.deepcopy(model).eval()
        fixed = Policy(space.fixed) if space.fixed else None
        self.net = Supernet(work, space.w_specs, space.a_specs, layers=space.names,
                            fixed=fixed, renormalise=True)
        calibrate_(work, calib if calib is not None else calibration_batches(train_set, seed=seed))
        self.x, self.y = stack_dataset(val_set, val_samples)
        self.space = space
        self._scorers: dict[str, PolicyValue] = {}
        self._memo: dict[tuple[Choice, str], float] = {}

    def value(self, choice: Sequence[int], metric: str = "acc") -> float:
        key = (tuple(int(k) for k in choice), metric)
        if key not in self._memo:
            if metric not in self._scorers:
                target = self.reference_logp() if metric == "neg_kl" else self.y
                self._scorers[metric] = PolicyValue(self.net, self.x, target, metric)
            self._memo[key] = self._scorers[metric](self.space.as_dict(key[0]))
        return self._memo[key]

    @torch.no_grad()
    def reference_logp(self) -> Tensor:
        """The float model's log-probabilities on the validation inputs (for neg_kl)."""
        if self._ref is None:
            was = self._float.training
            self._float.eval()
            logits = torch.cat([self._float(xb) for xb in self.x.split(1024)])
            self._float.train(was)
            self._ref = torch.log_softmax(logits, dim=1)
        return self._ref

    def values(self, choices: np.ndarray, metric: str = "acc") -> np.ndarray:
        return np.array([self.value(c, metric) for c in np.atleast_2d(choices)], dtype=float)

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self._scorers.values())

    @property
    def forward_seconds(self) -> float:
        return sum(s.forward_seconds for s in self._scorers.values())


@dataclass(frozen=True)
class SearchCost:
    """Wall time, validation forward passes, and the seconds inside them."""

    seconds: float = 0.0
    evaluations: int = 0
    forward_seconds: float = 0.0

    def __add__(self, other: SearchCost) -> SearchCost:
        return SearchCost(self.seconds + other.seconds, self.evaluations + other.evaluations,
                          self.forward_seconds + other.forward_seconds)


class Meter:
    """Measures what a strategy spends from now on (on an evaluator, if it uses one)."""

    def __init__(self, evaluator: PolicyEvaluator | None = None):
        self.evaluator = evaluator
        self.start = time.perf_counter()
        self.calls0 = evaluator.calls if evaluator is not None else 0
        self.fwd0 = evaluator.forward_seconds if evaluator is not None else 0.0

    def cost(self) -> SearchCost:
        ev = self.evaluator
        return SearchCost(
            time.perf_counter() - self.start,
            ev.calls - self.calls0 if ev is not None else 0,
            ev.forward_seconds - self.fwd0 if ev is not None else 0.0,
        )

    def result(self, name: str, policy: Policy, info: dict,
               extra: SearchCost | None = None) -> StrategyResult:
        """The StrategyResult; `extra` adds the cost of reused work (e.g. a sensitivity)."""
        c = self.cost() + (extra or SearchCost())
        meta = {**dict(policy.meta), "method": name}
        return StrategyResult(name, Policy(policy.layers, meta=meta), c.seconds,
                              c.evaluations, c.forward_seconds, info)
