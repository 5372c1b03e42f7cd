"""One search problem, one result type, and the table of strategies that turn one into the other.

A strategy is a plain function `f(problem: SearchProblem) -> StrategyResult`, registered where
it lives under a name and a kind:

| kind        | registered in                     | `problem.model` is        |
|-------------|-----------------------------------|---------------------------|
| cnn         | smpq.cnn.search.baselines         | the float `nn.Module`     |
| transformer | smpq.transformer.strategies       | a `PTQSession`            |

    @register("mine", kind="cnn")
    def mine(problem: SearchProblem) -> StrategyResult: ...

`compare`, the CLI and the benchmarks list and dispatch methods through `names` and `get`, so
a new strategy is one decorated function. The modules above are imported on the first lookup
of their kind, which keeps `import smpq` free of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec

__all__ = [
    "KINDS",
    "MAX_EVALUATIONS",
    "SearchProblem",
    "Strategy",
    "StrategyResult",
    "get",
    "names",
    "register",
    "unregister",
]

KINDS = ("cnn", "transformer")
# Most value evaluations (forward passes) a search may ask for: days of work on the smallest
# model; past it, per-evaluation arrays alone would outgrow any machine's memory.
MAX_EVALUATIONS = 10**6
_PROVIDERS = {"cnn": ("smpq.cnn.search.engine_search", "smpq.cnn.search.baselines",
                      "smpq.cnn.search.evolution"),
              "transformer": ("smpq.transformer.engine_strategy", "smpq.transformer.strategies",
                              "smpq.transformer.policy_search")}


@dataclass(frozen=True)
class SearchProblem:
    """Everything a strategy may look at: which model, which data, what it costs, the budget.

    w_specs / a_specs: candidate weight / activation formats (a_specs empty = weight-only);
    train: data a strategy may train or calibrate on (CNN: the training split);
    val: data it may score policies on (CNN: the validation split); never the test split;
    fixed: pinned layers (name -> choice, None = float), kept and not searched;
    options: method-specific knobs, documented by each strategy (unknown keys are ignored).
    """

    model: Any
    cost: ModelCost
    budget: Budget | None
    w_specs: tuple[QuantSpec, ...]
    a_specs: tuple[QuantSpec, ...] = ()
    train: Any = None
    val: Any = None
    fixed: Mapping[str, LayerChoice | None] = field(default_factory=dict)
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_specs", tuple(self.w_specs))
        object.__setattr__(self, "a_specs", tuple(self.a_specs))
        object.__setattr__(self, "fixed", dict(self.fixed or {}))
        object.__setattr__(self, "options", dict(self.options or {}))
        if not isinstance(self.cost, ModelCost):
            raise SmpqError(f"SearchProblem.cost must be a ModelCost, got {type(self.cost)}")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise SmpqError(f"SearchProblem.budget must be a Budget, got {type(self.budget)}")
        for s in (*self.w_specs, *self.a_specs):
            if not isinstance(s, QuantSpec):
                raise SmpqError(f"candidate formats must be QuantSpecs, got {s!r}")


@dataclass
class StrategyResult:
    """A strategy's policy and what it cost to find it.

    seconds: wall time of the search (strategies that reuse a measured sensitivity add its cost);
    evaluations: forward passes over the validation set (value evaluations);
    forward_seconds: the part of `seconds` spent inside those forward passes;
    info: strategy-specific extras that serialise (binding constraints, scores, ...);
    detail: the strategy's own full output (a SearchOutcome, a transformer allocation), not
    serialised.
    """

    name: str
    policy: Policy
    seconds: float
    evaluations: int = 0
    forward_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    detail: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "policy": self.policy.to_dict(), "seconds": self.seconds,
                "evaluations": self.evaluations, "forward_seconds": self.forward_seconds,
                "info": self.info}


Strategy = Callable[[SearchProblem], StrategyResult]


@dataclass(frozen=True)
class _Entry:
    fn: Strategy
    listed: bool


_REGISTRY: dict[str, dict[str, _Entry]] = {k: {} for k in KINDS}
_LOADED: set[str] = set()


def _kind(kind: str) -> dict[str, _Entry]:
    if kind not in _REGISTRY:
        raise SmpqError(f"unknown strategy kind {kind!r}; known: {', '.join(KINDS)}")
    if kind not in _LOADED:  # mark first: the providers call register() while importing
        _LOADED.add(kind)
        try:
            for module in _PROVIDERS[kind]:
                importlib.import_module(module)
        except BaseException:
            _LOADED.discard(kind)
            raise
    return _REGISTRY[kind]


def register(name: str, *, kind: str, listed: bool = True) -> Callable[[Strategy], Strategy]:
    """Decorator: file `fn` under (kind, name). `listed=False` keeps it out of default method
    lists (e.g. the exhaustive oracle, usable only on tiny spaces) but `get` still finds it."""
    table = _kind(kind)  # built-ins first, so default lists keep their order

    def deco(fn: Strategy) -> Strategy:
        if name in table:
            raise SmpqError(f"a {kind} strategy named {name!r} is already registered")
        table[name] = _Entry(fn, listed)
        _order(table, kind)
        return fn

    return deco


def _order(table: dict[str, _Entry], kind: str) -> None:
    """Keep the providers' order (their listed order, then registration order inside each),
    whatever order Python happens to import them in; others (plugins, tests) come last."""
    rank = {m: i for i, m in enumerate(_PROVIDERS[kind])}
    items = sorted(table.items(), key=lambda kv: rank.get(kv[1].fn.__module__, len(rank)))
    table.clear()
    table.update(items)


def unregister(name: str, kind: str) -> None:
    """Remove a registered strategy (tests, plugins replacing one)."""
    _kind(kind).pop(name, None)


def get(name: str, kind: str) -> Strategy:
    """The strategy registered as `name` for `kind`; SmpqError listing the known ones if none."""
    table = _kind(kind)
    if name not in table:
        raise SmpqError(f"unknown method {name!r}; known: {', '.join(table)}")
    return table[name].fn


def names(kind: str, *, listed_only: bool = False) -> tuple[str, ...]:
    """Registered names of `kind` in registration order (`listed_only`: default lists only)."""
    return tuple(n for n, e in _kind(kind).items() if e.listed or not listed_only)
