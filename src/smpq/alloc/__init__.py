"""The one allocator, shared by the CNN and transformer paths.

| module     | what                                                                        |
|------------|-----------------------------------------------------------------------------|
| problem    | units x candidates x metrics, limits, the one `fits` tolerance, messages     |
| objectives | linear, ladder-quadratic and pairwise objectives and their exact MILPs      |
| milp       | the solver loop, the binding report, top-K distinct policies, brute force    |
| feasible   | count, sample and enumerate the feasible policies; the Pareto front         |
| uniform    | the uniform baseline (one level for every unit)                             |

Names are loaded on first use, so that `smpq.cost` can use `fits` without importing scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Allocation": "milp",
    "LinearObjective": "objectives",
    "PairwiseObjective": "objectives",
    "QuadraticObjective": "objectives",
    "allocate_bruteforce": "milp",
    "allocate_milp": "milp",
    "allocate_quadratic": "milp",
    "allocate_quadratic_bruteforce": "milp",
    "allocate_topk": "milp",
    "FeasibleCount": "feasible",
    "count_feasible": "feasible",
    "enumerate_feasible": "feasible",
    "pareto_front": "feasible",
    "sample_feasible": "feasible",
    "REL_TOL": "problem",
    "Problem": "problem",
    "cheapest": "problem",
    "fits": "problem",
    "infeasible_message": "problem",
    "most_expensive": "problem",
    "tolerance": "problem",
    "uniform_choice": "uniform",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'smpq.alloc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"smpq.alloc.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
