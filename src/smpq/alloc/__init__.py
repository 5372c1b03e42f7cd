"""The allocation problem and its exact solver, shared by the CNN and transformer paths."""

from smpq.alloc.milp import (
    Allocation,
    FeasibleCount,
    allocate_bruteforce,
    allocate_milp,
    cheapest,
    count_feasible,
    most_expensive,
    pareto_front,
)

__all__ = [
    "Allocation",
    "FeasibleCount",
    "allocate_bruteforce",
    "allocate_milp",
    "cheapest",
    "count_feasible",
    "most_expensive",
    "pareto_front",
]
