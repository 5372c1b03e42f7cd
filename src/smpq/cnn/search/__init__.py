"""Search strategies: from a model, data and a budget to a mixed-precision policy.

Each is registered in `smpq.strategy` (kind "cnn", see baselines.py); look them up there.
"""

from smpq.cnn.search.baselines import (
    best_uniform,
    greedy,
    hawq,
    interaction_analysis,
    one_at_a_time,
    oracle,
    random_search,
    uniform,
)
from smpq.cnn.search.common import StrategyResult
from smpq.cnn.search.derive import Derivation, derive_argmax, derive_budgeted
from smpq.cnn.search.supernet_search import METHODS, SearchConfig, SearchOutcome, search

__all__ = [
    "METHODS",
    "StrategyResult",
    "best_uniform",
    "greedy",
    "hawq",
    "interaction_analysis",
    "one_at_a_time",
    "oracle",
    "random_search",
    "uniform",
    "Derivation",
    "SearchConfig",
    "SearchOutcome",
    "derive_argmax",
    "derive_budgeted",
    "search",
]
