"""Cost model: per-layer parameters and MACs from a traced forward pass, and budgets.

Why one module past ~400 lines: the metrics and the budget grammar that limits them must
agree term by term (scopes, pinned layers, the constant part of size), and `Budget.resolve`
is the one place where both meet; a split along `ModelCost` | `Budget` is the natural next
step if either grows.

Metrics of a policy (float layers count as 32/32):

| metric   | definition                                                                   |
|----------|------------------------------------------------------------------------------|
| size     | model size in bits: weights x w_bits + scales/zero points per granularity +  |
|          | biases and all other parameters (BatchNorm, ...) at 32 bits                   |
| bitops   | sum over layers of MACs x w_bits x a_bits (per sample)                        |
| avg_bits | parameter-weighted mean weight bits over the quantizable layers              |
| eff_bits | like avg_bits, but counting each layer's scale/zero-point storage too          |
|          | (GGUF block formats count their true bits per weight: q4_k 4.5, q3_k 3.4375)  |

Every metric is a sum of per-layer terms, so a budget is a set of linear constraints over
per-layer choices (what the exact allocator needs).

Budget strings (comma-separated, each `metric=value`):
    bitops=uniform:3/3        BitOps of uniform W3/A3 (pinned layers keep their choice)
    bitops=0.5*uniform:4/4    a fraction of a uniform reference
    size=20KiB  size=0.1MB    absolute size (bytes, with optional KB/MB/KiB/MiB suffix)
    avg_bits=3.5              average weight bits
    eff_bits=4.25             average weight bits including scale/zero-point overhead
    bitops=1.2e6              absolute BitOps

Scope: `metric@searched=...` states a constraint over the searched layers only; `metric=...`
(the same as `metric@all=...`) is over the whole model. Which layers are not searched is what
the caller passes as `pinned` (and, in `Budget.resolve`, `fixed`): the pinned first/last layers
and layers kept in float (a `None` choice). In each scope:

| scope    | size                        | bitops              | avg_bits / eff_bits             |
|----------|-----------------------------|---------------------|---------------------------------|
| all      | every layer (float ones at  | every layer (float  | mean over every quantizable     |
|          | 32 bits) + other parameters | ones at 32x32 bits) | layer, weighted by parameters   |
| searched | searched layers' weights,   | searched layers     | mean over the searched layers,  |
|          | scales and biases only      | only                | weighted by their parameters    |

so `bitops@searched=uniform:3/3` is "the searched layers cost at most what they cost at W3/A3",
whatever the pinned and float layers cost. With nothing pinned the two scopes differ only in
size, where `searched` leaves out the parameters outside the quantizable layers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn

from smpq.alloc.problem import fits, infeasible_message
from smpq.apply import quantizable_layers
from smpq.blockformats import BLOCK_FORMATS
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import Granularity, LayerChoice, QuantSpec, parse_bits_pair

__all__ = [
    "METRICS",
    "Budget",
    "Constraint",
    "LayerCost",
    "ModelCost",
    "ResolvedBudget",
    "Scope",
    "format_metric",
    "n_scales",
    "trace_costs",
    "weight_bits",
]

METRICS = ("size", "bitops", "avg_bits", "eff_bits")
FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    bias: int
    macs: int


def n_scales(weight_shape: Sequence[int], spec: QuantSpec) -> int:
    """How many scales a weight of this shape stores under the spec's granularity."""
    out = weight_shape[0]
    fan_in = math.prod(weight_shape[1:])
    if spec.granularity is Granularity.TENSOR:
        return 1
    if spec.granularity is Granularity.CHANNEL:
        return out
    return out * math.ceil(fan_in / spec.group_size)


def weight_bits(lc: LayerCost, spec: QuantSpec | None) -> float:
    """Storage of one layer's weight in bits, with scale and zero-point overhead."""
    if spec is None:
        return float(FLOAT_BITS * lc.params)
    if spec.is_block:  # bytes on disk: whole blocks, scales included
        return float(lc.params * BLOCK_FORMATS[spec.fmt].bpw)
    per_scale = spec.scale_bits + (0 if spec.symmetric else spec.bits)
    return float(lc.params * spec.bits + n_scales(lc.weight_shape, spec) * per_scale)


@torch.no_grad()
def trace_costs(model: nn.Module, sample: Tensor, layers: Iterable[str] | None = None) -> ModelCost:
    """Run one sample through the model and record each quantizable layer's MACs."""
    mods = quantizable_layers(model)
    if layers is not None:
        mods = {n: mods[n] for n in layers}
    macs: dict[str, int] = dict.fromkeys(mods, 0)

    def hook(name):
        def fn(mod, inputs, output):
            # MACs per output element: (in/groups) * kh * kw for a conv, in_features for linear
            per_out = mod.weight[0].numel()
            macs[name] += int(output.numel() // output.shape[0]) * per_out

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    was_training = model.training
    model.eval()
    try:
        model(sample[:1])
    except Exception as exc:  # a shape mismatch is the user's model/data, say it in one line
        raise SmpqError(f"forward pass on the sample input failed: {exc}") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    quant_ids = {id(m.weight) for m in mods.values()}
    quant_ids |= {id(m.bias) for m in mods.values() if m.bias is not None}
    other = sum(p.numel() for p in model.parameters() if id(p) not in quant_ids)
    costs = {
        n: LayerCost(
            name=n,
            kind=type(m).__name__,
            weight_shape=tuple(m.weight.shape),
            params=m.weight.numel(),
            bias=m.bias.numel() if m.bias is not None else 0,
            macs=macs[n],
        )
        for n, m in mods.items()
    }
    return ModelCost(costs, other_params=other)


class ModelCost:
    """Per-layer costs of one model; evaluates policies and per-choice cost vectors."""

    def __init__(self, layers: Mapping[str, LayerCost], other_params: int = 0):
        self.layers = dict(layers)
        self.other_params = other_params
        self.total_params = sum(lc.params for lc in self.layers.values())

    @classmethod
    def from_linears(cls, linears: Mapping[str, nn.Module], other_params: int = 0) -> ModelCost:
        """Costs of weight-only layers (e.g. a transformer's nn.Linear): MACs per token."""
        layers = {}
        for n, m in linears.items():
            params = m.weight.numel()
            bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
            layers[n] = LayerCost(n, type(m).__name__, tuple(m.weight.shape), params, bias,
                                  macs=params)
        return cls(layers, other_params=other_params)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def choice_cost(self, name: str, choice: LayerChoice | None) -> dict[str, float]:
        """The layer's contribution to each metric (constants excluded from size)."""
        lc = self.layers[name]
        w = choice.weight if choice is not None else None
        wb = choice.w_bits if choice is not None else FLOAT_BITS
        ab = choice.a_bits if choice is not None else FLOAT_BITS
        return {
            "size": weight_bits(lc, w) + FLOAT_BITS * lc.bias,
            "bitops": float(lc.macs * wb * ab),
            "avg_bits": lc.params * wb / self.total_params,
            "eff_bits": weight_bits(lc, w) / self.total_params,
        }

    def choice_costs(
        self, name: str, choices: Sequence[LayerChoice | None]
    ) -> dict[str, np.ndarray]:
        rows = [self.choice_cost(name, c) for c in choices]
        return {m: np.array([r[m] for r in rows]) for m in METRICS}

    @property
    def constant_size(self) -> float:
        """Bits that no policy changes: parameters outside the quantizable layers."""
        return float(FLOAT_BITS * self.other_params)

    def metrics(self, policy: Policy) -> dict[str, float]:
        missing = [n for n in self.layers if n not in policy.layers]
        if missing:
            raise SmpqError(f"policy is missing layer(s): {', '.join(missing)}")
        tot = dict.fromkeys(METRICS, 0.0)
        for name in self.layers:
            for m, v in self.choice_cost(name, policy.layers[name]).items():
                tot[m] += v
        tot["size"] += self.constant_size
        return tot

    def scoped_metrics(self, policy: Policy, excluded: Iterable[str]) -> dict[str, float]:
        """Metrics over the layers not in `excluded` only (scope `searched`, see module doc)."""
        excluded = set(excluded)
        kept = [n for n in self.layers if n not in excluded]
        missing = [n for n in kept if n not in policy.layers]
        if missing:
            raise SmpqError(f"policy is missing layer(s): {', '.join(missing)}")
        tot = dict.fromkeys(METRICS, 0.0)
        for name in kept:
            for m, v in self.choice_cost(name, policy.layers[name]).items():
                tot[m] += v
        factor = self._mean_factor(excluded)
        return {m: v * factor if m in _MEANS else v for m, v in tot.items()}

    def _mean_factor(self, excluded: set[str]) -> float:
        """total / searched parameters: rescales a per-layer mean term to the searched mean."""
        kept = sum(lc.params for n, lc in self.layers.items() if n not in excluded)
        if kept == 0:
            raise SmpqError("a budget over the searched layers needs at least one searched "
                            "layer, but every layer is pinned")
        return self.total_params / kept

    def to_dict(self) -> dict:
        """JSON form (what a search run saves as cost.json, so it can be re-derived)."""
        return {"version": 1, "other_params": self.other_params,
                "layers": [{"name": lc.name, "kind": lc.kind,
                            "weight_shape": list(lc.weight_shape), "params": lc.params,
                            "bias": lc.bias, "macs": lc.macs} for lc in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelCost:
        try:
            layers = {str(r["name"]): LayerCost(str(r["name"]), str(r["kind"]),
                                                tuple(int(x) for x in r["weight_shape"]),
                                                int(r["params"]), int(r["bias"]), int(r["macs"]))
                      for r in d["layers"]}
            return cls(layers, other_params=int(d["other_params"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SmpqError(f"malformed cost table: {exc!r}") from None

    def table(self, policy: Policy) -> list[dict]:
        """Per-layer rows for display: name, kind, params, MACs, bits, size, BitOps."""
        rows = []
        for name, lc in self.layers.items():
            choice = policy.layers.get(name)
            c = self.choice_cost(name, choice)
            rows.append({
                "layer": name, "kind": lc.kind, "params": lc.params, "macs": lc.macs,
                "w_bits": choice.w_bits if choice else FLOAT_BITS,
                "a_bits": choice.a_bits if choice else FLOAT_BITS,
                "size_bits": c["size"], "bitops": c["bitops"],
            })
        return rows


def format_metric(metric: str, value: float) -> str:
    if metric == "size":
        return f"{value / 8 / 1024:.2f} KiB"
    if metric == "bitops":
        return f"{value / 1e6:.3f} MBitOps"
    return f"{value:.3f} bits"


# -- budgets --------------------------------------------------------------------------------

_MEANS = ("avg_bits", "eff_bits")  # metrics that are per-parameter means, not sums
_SIZE_UNITS = {"": 8, "b": 8, "kb": 8e3, "mb": 8e6, "kib": 8 * 1024, "mib": 8 * 1024**2}
_REF = re.compile(r"^(?:(?P<ratio>[0-9.eE+-]+)\s*\*\s*)?uniform:(?P<pair>\S+)$")
_NUM = re.compile(r"^(?P<num>[0-9.eE+-]+)\s*(?P<unit>[a-zA-Z]*)$")


class Scope(str, Enum):
    """Which layers a constraint sums over (module doc): the whole model, or the searched."""

    ALL = "all"
    SEARCHED = "searched"


@dataclass(frozen=True)
class Constraint:
    """metric <= value, or metric <= ratio x metric(uniform reference W/A), in a scope."""

    metric: str
    value: float | None = None
    ratio: float = 1.0
    reference: tuple[int, int] | None = None
    scope: Scope = Scope.ALL

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scope", Scope(self.scope))
        except ValueError:
            raise SmpqError(f"unknown budget scope {self.scope!r}; known: "
                            f"{', '.join(s.value for s in Scope)}") from None
        if self.metric not in METRICS:
            raise SmpqError(f"unknown budget metric {self.metric!r}; known: {', '.join(METRICS)}")
        if (self.value is None) == (self.reference is None):
            raise SmpqError("a budget constraint needs exactly one of a value or a reference")
        if self.value is not None and not (math.isfinite(self.value) and self.value > 0):
            raise SmpqError(f"budget value for {self.metric} must be positive, got {self.value}")
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise SmpqError(f"budget ratio must be positive, got {self.ratio}")

    @classmethod
    def parse(cls, text: str) -> Constraint:
        metric, sep, rhs = text.strip().partition("=")
        metric, rhs = metric.strip(), rhs.strip()
        if not sep or not rhs:
            raise SmpqError(f"budget must look like 'bitops=uniform:3/3', got {text!r}")
        metric, at, scope = metric.partition("@")
        metric, scope = metric.strip(), scope.strip()
        if at and scope not in {s.value for s in Scope}:
            raise SmpqError(f"unknown budget scope {scope!r} in {text!r}; use "
                            f"{metric}@searched=... or {metric}=... (all layers)")
        scope = Scope(scope) if at else Scope.ALL
        if metric not in METRICS:
            raise SmpqError(f"unknown budget metric {metric!r}; known: {', '.join(METRICS)}")
        ref = _REF.match(rhs)
        if ref:
            ratio = _float(ref["ratio"], text) if ref["ratio"] else 1.0
            return cls(metric, ratio=ratio, reference=parse_bits_pair(ref["pair"]), scope=scope)
        num = _NUM.match(rhs)
        if not num:
            raise SmpqError(f"cannot read budget value {rhs!r} in {text!r}")
        value, unit = _float(num["num"], text), num["unit"].lower()
        if metric == "size":
            if unit not in _SIZE_UNITS:
                raise SmpqError(f"unknown size unit {num['unit']!r}; use B, KB, MB, KiB or MiB")
            value *= _SIZE_UNITS[unit]
        elif unit:
            raise SmpqError(f"{metric} takes no unit, got {num['unit']!r}")
        return cls(metric, value=value, scope=scope)

    @property
    def searched(self) -> bool:
        return self.scope is Scope.SEARCHED

    def limit(self, cost: ModelCost, pinned: Mapping[str, LayerChoice | None] | None) -> float:
        """The limit in the constraint's own scope (searched = layers not in `pinned`)."""
        if self.value is not None:
            return self.value
        ref = Policy.uniform(cost.names, *self.reference, pinned=pinned)
        return self.ratio * self.measure(cost, ref, pinned or {})

    def measure(self, cost: ModelCost, policy: Policy, excluded: Iterable[str]) -> float:
        """The policy's metric in this constraint's scope (`excluded`: the unsearched)."""
        if self.searched:
            return cost.scoped_metrics(policy, excluded)[self.metric]
        return cost.metrics(policy)[self.metric]

    def __str__(self) -> str:
        head = f"{self.metric}@{self.scope.value}" if self.searched else self.metric
        if self.reference is not None:
            pre = "" if self.ratio == 1.0 else f"{_num(self.ratio)}*"
            return f"{head}={pre}uniform:{self.reference[0]}/{self.reference[1]}"
        if self.metric == "size":  # stored in bits, written in bytes so that it parses back
            return f"{head}={_num(self.value / 8)}B"
        return f"{head}={_num(self.value)}"


def _num(v: float) -> str:
    """Short form (%g) when it reads back exactly, else the full repr."""
    short = f"{v:g}"
    return short if float(short) == v else repr(v)


def _float(s: str, text: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise SmpqError(f"cannot read number {s!r} in budget {text!r}") from None


@dataclass(frozen=True)
class Budget:
    """Constraints that must all hold (the module doc gives the grammar and the scopes).

    Every method takes `pinned`: the layers outside the search, with the choice they keep
    (`None` = float). `uniform:W/A` references keep those choices, and `metric@searched`
    constraints leave those layers out (module doc); `metric=...` counts them, float ones at
    32 bits (32x32 for BitOps).
    """

    constraints: tuple[Constraint, ...]

    @classmethod
    def parse(cls, text: str | Sequence[str]) -> Budget:
        parts = [text] if isinstance(text, str) else list(text)
        items = [p for t in parts for p in str(t).split(",") if p.strip()]
        if not items:
            raise SmpqError("empty budget")
        cons = tuple(Constraint.parse(p) for p in items)
        metrics = [c.metric for c in cons]
        dup = {m for m in metrics if metrics.count(m) > 1}
        if dup:
            raise SmpqError(f"budget names {', '.join(sorted(dup))} more than once")
        return cls(cons)

    def limits(
        self, cost: ModelCost, pinned: Mapping[str, LayerChoice | None] | None = None
    ) -> dict[str, float]:
        """Each constraint's limit in its own scope (what `check` compares values against)."""
        return {c.metric: c.limit(cost, pinned) for c in self.constraints}

    def full_limits(
        self, cost: ModelCost, pinned: Mapping[str, LayerChoice | None] | None = None
    ) -> dict[str, float]:
        """Limits on the whole-model metrics. A searched-scope limit becomes one by adding
        what the pinned layers (at their pinned choice) and, for size, the constant part
        add; while the pinned layers keep their choice, the two limits hold together."""
        pinned = dict(pinned or {})
        out = {}
        for c in self.constraints:
            v = c.limit(cost, pinned)
            if c.searched:
                if c.metric in _MEANS:
                    v /= cost._mean_factor(set(pinned))
                v += _offset(cost, c.metric, pinned)
            out[c.metric] = v
        return out

    def layer_limits(
        self, cost: ModelCost, pinned: Mapping[str, LayerChoice | None] | None = None
    ) -> dict[str, float]:
        """Limits on the sum of per-layer costs (the constant part of size removed)."""
        lim = self.full_limits(cost, pinned)
        if "size" in lim:
            lim["size"] -= cost.constant_size
        return lim

    def check(
        self, cost: ModelCost, policy: Policy, pinned: Mapping | None = None
    ) -> list[dict]:
        """Per constraint, in its scope: limit, value reached, slack (limit - value), ok."""
        pinned = pinned or {}
        got = {c.metric: c.measure(cost, policy, pinned) for c in self.constraints}
        return _check_rows(self.constraints, self.limits(cost, pinned), got)

    def resolve(
        self,
        cost: ModelCost,
        candidates: Mapping[str, Sequence[LayerChoice | None]],
        pinned: Mapping[str, LayerChoice | None] | None = None,
        fixed: Mapping[str, LayerChoice | None] | None = None,
    ) -> ResolvedBudget:
        """The budget as numbers, once per run; raises if even the cheapest policy breaks it.

        `candidates` gives each searched layer's allowed choices; `fixed` layers keep their
        choice and move their cost (with the constant part of size) to the right-hand side;
        `pinned` is what `uniform:W/A` references keep. Searched-scope constraints leave out
        the pinned and the fixed layers. The error names the cheapest reachable value of
        every unreachable limit, in the constraint's scope.
        """
        fixed = dict(fixed or {})
        outside = {**(pinned or {}), **fixed}  # not searched, at the choice they keep
        scoped, lim, scale = {}, {}, {}
        for c in self.constraints:
            m = c.metric
            if c.searched:
                factor = cost._mean_factor(set(outside)) if m in _MEANS else 1.0
                scoped[m] = c.limit(cost, outside)
                lim[m] = scoped[m] / factor + _offset(cost, m, outside)
                scale[m] = abs(scoped[m]) / factor
            else:
                lim[m] = c.limit(cost, pinned)
                scale[m] = abs(lim[m])
        parts = []
        for c in self.constraints:
            m = c.metric
            low = cost.constant_size if m == "size" else 0.0
            for name, choices in candidates.items():
                low += min(cost.choice_cost(name, ch)[m] for ch in choices)
            for name, choice in fixed.items():
                low += cost.choice_cost(name, choice)[m]
            if not fits(low, lim[m]):
                if c.searched:
                    factor = cost._mean_factor(set(outside)) if m in _MEANS else 1.0
                    low = (low - _offset(cost, m, outside)) * factor
                    parts.append((f"{m}@searched", scoped[m], low))
                else:
                    parts.append((m, lim[m], low))
        if parts:
            raise SmpqError(infeasible_message(
                parts, lambda m, v: format_metric(m.partition("@")[0], v)))
        units = dict(lim)
        if "size" in units:
            units["size"] -= cost.constant_size
        for name, choice in fixed.items():
            for m, v in cost.choice_cost(name, choice).items():
                if m in units:
                    units[m] -= v
        return ResolvedBudget(self, lim, units, frozenset(outside), scoped, scale)

    def ensure_feasible(
        self,
        cost: ModelCost,
        candidates: Mapping[str, Sequence[LayerChoice | None]],
        pinned: Mapping[str, LayerChoice | None] | None = None,
    ) -> dict[str, float]:
        """Raise a clear error naming the cheapest reachable value if a limit cannot be met.

        `candidates` gives each layer's allowed choices. Returns the limits (`resolve`).
        """
        return self.resolve(cost, candidates, pinned).limits

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.constraints)


def _offset(cost: ModelCost, metric: str, outside: Mapping[str, LayerChoice | None]) -> float:
    """What the layers outside the search (and, for size, the constant part) add to a metric."""
    base = cost.constant_size if metric == "size" else 0.0
    return base + sum(cost.choice_cost(n, ch)[metric] for n, ch in outside.items())


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget resolved once per run (`Budget.resolve`): what every allocator is handed.

    `limits` bound the whole-model metrics (a searched-scope limit plus what the layers
    outside the search add); `unit_limits` bound the sum of the searched layers' costs (fixed
    layers and constant size moved to the right-hand side). `scales` are the tolerance scales
    to pass with `unit_limits` to the allocator, so that a policy fits there exactly when it
    fits here (`smpq.alloc.problem.fits`). `outside` names the layers a searched-scope
    constraint leaves out, `scoped_limits` are those constraints' own limits.
    """

    budget: Budget
    limits: dict[str, float]
    unit_limits: dict[str, float]
    outside: frozenset[str] = frozenset()
    scoped_limits: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)

    @property
    def scales(self) -> dict[str, float]:
        return {m: self.scale.get(m, abs(v)) for m, v in self.limits.items()}

    def check(self, cost: ModelCost, policy: Policy) -> list[dict]:
        """`Budget.check` against the resolved limits, each constraint in its scope."""
        lim = {**self.limits, **self.scoped_limits}
        got = {c.metric: c.measure(cost, policy, self.outside) for c in self.budget.constraints}
        return _check_rows(self.budget.constraints, lim, got)

    def fits(self, cost: ModelCost, policy: Policy) -> bool:
        return all(r["ok"] for r in self.check(cost, policy))


def _check_rows(constraints: Sequence[Constraint], limits: Mapping[str, float],
                got: Mapping[str, float]) -> list[dict]:
    return [{"constraint": str(c), "metric": c.metric, "limit": limits[c.metric],
             "value": got[c.metric], "slack": limits[c.metric] - got[c.metric],
             "ok": fits(got[c.metric], limits[c.metric])} for c in constraints]
