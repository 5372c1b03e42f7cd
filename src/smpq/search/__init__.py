"""Search strategies: from a model, data and a budget to a mixed-precision policy."""

from smpq.search.derive import Derivation, derive_argmax, derive_budgeted
from smpq.search.supernet_search import METHODS, SearchConfig, SearchOutcome, search

__all__ = [
    "METHODS",
    "Derivation",
    "SearchConfig",
    "SearchOutcome",
    "derive_argmax",
    "derive_budgeted",
    "search",
]
