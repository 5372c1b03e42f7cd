"""The allocation problem: per-unit candidate costs per metric, limits, and what "fits" means.

A unit (a layer, or a group of layers that share one format) has `K_u` candidate choices, each
with a cost under every metric. A policy picks one choice per unit; it fits when, for every
limited metric, the summed cost is at most the limit. Every caller -- `Budget.check`, the
MILP, the feasible-policy counter and sampler, the uniform helper, the CNN oracle -- decides
"fits" with `fits` below, so a policy is judged the same way everywhere:

    fits(total, limit, scale)  <=>  total <= limit + REL_TOL * max(|limit|, |scale|)

`scale` is the magnitude the rounding error of the sum grows with. A `Budget` resolved into
per-unit limits passes the full metric's limit (`ResolvedBudget.scales`), so the slack on the
per-unit sum is exactly the slack `Budget.check` allows on the full metric; with no scale
given, the allocator uses the sum of each unit's largest |cost|.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smpq.errors import SmpqError

__all__ = [
    "REL_TOL",
    "SCORE_REL_TOL",
    "Problem",
    "cheapest",
    "fits",
    "infeasible_message",
    "most_expensive",
    "tolerance",
]

REL_TOL = 1e-9
SCORE_REL_TOL = 1e-8  # objective values closer than this x their spread count as equal

Layers = tuple[np.ndarray, ...]


def tolerance(limit: float, scale: float = 0.0) -> float:
    """Absolute slack allowed on a limit: REL_TOL of the larger of |limit| and |scale|."""
    return REL_TOL * max(abs(float(limit)), abs(float(scale)))


def fits(total: float, limit: float, scale: float = 0.0) -> bool:
    """True when `total` meets `limit` (the one definition of "fits", see the module doc)."""
    return bool(total <= limit + tolerance(limit, scale))


def _g(value: float) -> str:
    return f"{value:.6g}"


def infeasible_message(
    parts: Sequence[tuple[str, float, float]], fmt: Callable[[str, float], str] | None = None
) -> str:
    """'budget infeasible: <metric> limit L is below the cheapest reachable C; ...'.

    `parts` holds (metric, limit, cheapest) for each unreachable limit; `fmt(metric, value)`
    formats the numbers (default: 6 significant digits)."""
    show = fmt or (lambda _m, v: _g(v))
    text = "; ".join(
        f"{m} limit {show(m, lim)} is below the cheapest reachable {show(m, low)}"
        for m, lim, low in parts
    )
    return "budget infeasible: " + text


# ---------------------------------------------------------------------------- validation


def as_layers(name: str, layers: object, sizes: tuple[int, ...] | None) -> Layers:
    """One finite, non-empty 1-D float array per unit, matching `sizes` when given."""
    if isinstance(layers, (str, bytes, Mapping)):
        raise SmpqError(f"{name} must be a list with one array per layer")
    try:
        items = list(layers)  # type: ignore[call-overload]
    except TypeError:
        raise SmpqError(f"{name} must be a list with one array per layer") from None
    if not items:
        raise SmpqError(f"{name} has no layers")
    if sizes is not None and len(items) != len(sizes):
        raise SmpqError(f"{name} has {len(items)} layers, expected {len(sizes)}")
    out = []
    for layer, item in enumerate(items):
        try:
            arr = np.array(item, dtype=float)
        except (TypeError, ValueError):
            raise SmpqError(f"{name} layer {layer} is not numeric") from None
        if arr.ndim != 1 or arr.size == 0:
            raise SmpqError(
                f"{name} layer {layer} must be a non-empty 1-D array, got shape {arr.shape}"
            )
        if sizes is not None and arr.size != sizes[layer]:
            raise SmpqError(f"{name} layer {layer} has {arr.size} choices, expected {sizes[layer]}")
        if not np.all(np.isfinite(arr)):
            raise SmpqError(f"{name} layer {layer} has a non-finite value")
        arr.setflags(write=False)
        out.append(arr)
    return tuple(out)


def as_costs(costs: object, sizes: tuple[int, ...] | None) -> dict[str, Layers]:
    """Validated cost layers per metric; all metrics share the layer shapes."""
    if not isinstance(costs, Mapping):
        raise SmpqError("costs must map metric name -> one array per layer")
    out: dict[str, Layers] = {}
    for metric, layers in costs.items():
        out[str(metric)] = as_layers(f"costs[{metric!r}]", layers, sizes)
        if sizes is None:
            sizes = tuple(len(a) for a in out[str(metric)])
    return out


def as_limits(limits: object, costs: Mapping[str, Layers]) -> dict[str, float]:
    """Finite limits, each for a metric that has costs."""
    if not isinstance(limits, Mapping):
        raise SmpqError("limits must map metric name -> upper limit")
    out: dict[str, float] = {}
    for metric, value in limits.items():
        if metric not in costs:
            known = ", ".join(sorted(costs)) or "none"
            raise SmpqError(f"limit for {metric!r} has no costs (metrics with costs: {known})")
        try:
            limit = float(value)
        except (TypeError, ValueError):
            raise SmpqError(f"limit for {metric!r} must be a number, got {value!r}") from None
        if not math.isfinite(limit):
            raise SmpqError(f"limit for {metric!r} must be a finite number, got {limit}")
        out[metric] = limit
    return out


def low(layers: Layers) -> float:
    return math.fsum(float(np.min(a)) for a in layers)


def high(layers: Layers) -> float:
    return math.fsum(float(np.max(a)) for a in layers)


def total(layers: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    return math.fsum(float(a[k]) for a, k in zip(layers, choice, strict=True))


def cost_scale(layers: Layers) -> float:
    """Default tolerance scale: the sum of each unit's largest |cost|."""
    return sum(float(np.max(np.abs(a))) for a in layers)


# ---------------------------------------------------------------------------- the problem


@dataclass(frozen=True)
class Problem:
    """Validated costs and limits, with the absolute slack `tols` each limit allows."""

    costs: dict[str, Layers]
    limits: dict[str, float]
    tols: dict[str, float]

    @classmethod
    def build(cls, costs: object, limits: object, sizes: tuple[int, ...] | None = None,
              scales: Mapping[str, float] | None = None) -> Problem:
        """`scales[m]` (optional, per metric) replaces the default tolerance scale."""
        layers = as_costs(costs, sizes)
        lims = as_limits(limits, layers)
        scales = dict(scales or {})
        tols = {m: tolerance(lim, scales[m] if m in scales else cost_scale(layers[m]))
                for m, lim in lims.items()}
        return cls(layers, lims, tols)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(a) for a in next(iter(self.costs.values())))

    def fits(self, metric: str, value: float) -> bool:
        return bool(value <= self.limits[metric] + self.tols[metric])

    def feasible(self, metrics: Sequence[str], choice: Sequence[int]) -> bool:
        return all(self.fits(m, total(self.costs[m], choice)) for m in metrics)

    def active(self) -> tuple[str, ...]:
        """Limits that some policy could break; the rest can never bind and are left out."""
        return tuple(m for m in self.limits if not self.fits(m, high(self.costs[m])))

    def unreachable(self) -> list[tuple[str, float, float]]:
        """(metric, limit, cheapest) for every limit below what the cheapest choices cost."""
        return [(m, lim, low(self.costs[m])) for m, lim in self.limits.items()
                if not self.fits(m, low(self.costs[m]))]

    def unreachable_message(self) -> str | None:
        parts = self.unreachable()
        return infeasible_message(parts) if parts else None

    def joint_message(self, metrics: Sequence[str]) -> str:
        alone = ", ".join(
            f"{m} cheapest {_g(low(self.costs[m]))} <= limit {_g(self.limits[m])}"
            for m in metrics
        )
        return (
            f"budget infeasible: each limit is reachable on its own ({alone}) "
            "but no policy meets all of them at once"
        )

    def tight(self, metric: str, choice: Sequence[int], slack: float) -> bool:
        """True when no single-unit move that raises `metric` fits in the slack."""
        steps = [
            float(np.min(up))
            for a, k in zip(self.costs[metric], choice, strict=True)
            if (up := a[a > a[k] + self.tols[metric]] - a[k]).size
        ]
        return bool(steps) and slack < min(steps)


def cheapest(costs: Mapping[str, Sequence[np.ndarray]]) -> dict[str, float]:
    """Lowest reachable total per metric (each metric minimised on its own)."""
    return {m: low(layers) for m, layers in as_costs(costs, None).items()}


def most_expensive(costs: Mapping[str, Sequence[np.ndarray]]) -> dict[str, float]:
    """Highest reachable total per metric: a limit at or above it never constrains."""
    return {m: high(layers) for m, layers in as_costs(costs, None).items()}
