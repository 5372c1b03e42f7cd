"""smpq.alloc.quiet: HiGHS's C-level chatter never reaches the terminal, our own output does.

Each case runs in a subprocess, so that what reaches the real file descriptors 1 and 2 is
what gets checked (pytest's capture would hide the difference).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# A 0/1 knapsack with 3 rows on which HiGHS (scipy 1.17) prints
# "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();" to stdout.
CHATTY = """
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
rng = np.random.default_rng(0)
for _ in range(22):
    c, A = -rng.random(60), rng.random((3, 60))
def solve():
    return milp(c, integrality=np.ones(60), bounds=Bounds(0, 1),
                constraints=LinearConstraint(A, -np.inf, A.sum(1) * 0.3),
                options={"mip_rel_gap": 0.0, "time_limit": 5.0})
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_highs_chatter_is_swallowed_and_our_output_kept():
    loud = _run(CHATTY + "solve()\n")
    assert loud.returncode == 0, loud.stderr
    if "Highs" not in loud.stdout + loud.stderr:
        pytest.skip("this HiGHS build does not print on the chatty instance")
    quiet = _run(CHATTY + textwrap.dedent("""
        import sys
        from smpq.alloc.quiet import quiet_solver
        print("before", end=" ")  # buffered in Python: must not be swallowed
        with quiet_solver():
            res = solve()
        print("after", res.status)
        print("err", file=sys.stderr)
    """))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "before after 0\n"
    assert quiet.stderr == "err\n"


def test_c_level_writes_inside_are_dropped_even_when_buffered():
    res = _run("""
        import ctypes, os, sys
        from smpq.alloc.quiet import quiet_solver
        libc = ctypes.CDLL(None)
        with quiet_solver():
            os.write(1, b"raw-out\\n")
            os.write(2, b"raw-err\\n")
            libc.printf(b"c-buffered\\n")  # stdout is a pipe: sits in C's buffer until flushed
            print("py-inside")
            print("py-inside", file=sys.stderr)
        libc.fflush(None)
        print("visible")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "visible\n"
    assert res.stderr == ""


def test_allocate_milp_runs_the_solver_quietly():
    """A stand-in for HiGHS that prints at the fd level, called the way allocate_milp calls it."""
    res = _run("""
        import os
        import numpy as np
        import smpq.alloc.milp as m
        real = m.milp
        def noisy(*args, **kwargs):
            os.write(1, b"CHATTER-OUT\\n")
            os.write(2, b"CHATTER-ERR\\n")
            return real(*args, **kwargs)
        m.milp = noisy
        scores = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 3.0, 1.0])]
        costs = {"size": [np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])]}
        alloc = m.allocate_milp(scores, costs, {"size": 4.0})
        print(list(alloc.choice))
    """)
    assert res.returncode == 0, res.stderr
    assert "CHATTER" not in res.stdout + res.stderr
    # by enumeration: within size 4 the best is (1, 1) = 4.0 or (2, 0) = 2.0, (0, 2) = 1.0
    assert res.stdout.strip() == "[1, 1]"
