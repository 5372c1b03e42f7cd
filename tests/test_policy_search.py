"""The plain policy searches `random` and `local` (smpq.transformer.policy_search).

References: feasibility by `Budget.check` on the policy, moves by enumeration of every unit
pair, values recomputed by swapping weights and calling `kl_to_float` directly.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq import strategy  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.engine.space import PolicySpace  # noqa: E402
from smpq.strategy import SearchProblem  # noqa: E402
from smpq.transformer.mixed import MixedConfig  # noqa: E402
from smpq.transformer.policy_search import local_moves  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings  # noqa: E402
from smpq.transformer.values import kl_to_float  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"
SMALL = RunSettings(block=32, calib_blocks=4, val_blocks=4, test_blocks=4,
                    shapley=MixedConfig(permutations=4, tolerance=None))
BUDGET = Budget.parse("avg_bits=3.5")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=2, max_positions=64)
    yield PTQSession(str(folder), "rtn", CANDS, SMALL).prepare()
    torch.set_num_threads(before)


def _neg_log_kl(session, choice) -> float:
    keys = session.candidates.keys
    with session.swapper.applied({n: keys[k] for g, k in zip(session.groups, choice, strict=True)
                                  for n in g}):
        return -math.log(kl_to_float(session.model, session.refs["calib"]) + 1e-9)


def _search(session, name, n, seed=0):
    return strategy.get(name, "transformer")(SearchProblem(
        session, session.cost, BUDGET, session.specs, seed=seed,
        options={"n_evaluations": n}))


def test_local_moves_are_every_feasible_equal_size_swap():
    """Units 0, 1 have one cost row, unit 2 another: unit 0 may only trade with unit 1, and
    unit 2 (no equal-size partner) with any; checked against enumerating every pair."""
    rows = (np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 4.0]), np.array([3.0, 6.0, 12.0]))
    sp = PolicySpace(("a", "b", "c"), ((3,),) * 3, {"size": rows}, {}, {"size": 12.0}, ("w",))
    lv = np.array([1, 1, 1])  # total 10
    got = set(local_moves(sp, lv, np.random.default_rng(0)))
    want = set()
    for u, v in itertools.permutations(range(3), 2):
        same = [w for w in range(3) if w != u and np.allclose(rows[w], rows[u])]
        if v not in (same or range(3)):
            continue
        nxt = lv.copy()
        nxt[u] += 1
        nxt[v] -= 1
        if sum(r[k] for r, k in zip(rows, nxt, strict=True)) <= 12.0:
            want.add((u, v))
    assert got == want and (0, 1) in got and (2, 0) not in got  # c up: +6, a down: -1


def test_random_and_local_return_a_fitting_policy_that_is_the_best_they_measured(session):
    for name in ("random", "local"):
        res = _search(session, name, 8)
        cost = res.detail.cost
        assert 1 <= cost["evaluations"] <= 8
        assert all(r["ok"] for r in BUDGET.check(session.cost, res.policy))
        mine = _neg_log_kl(session, res.detail.choice)
        assert max(res.info["value_curve"]) == pytest.approx(mine, rel=1e-6, abs=1e-9)


def test_local_never_ends_below_its_fisher_start(session):
    fisher = _search(session, "fisher", 1)
    start = _neg_log_kl(session, fisher.detail.choice)
    res = _search(session, "local", 10, seed=3)
    assert _neg_log_kl(session, res.detail.choice) >= start - 1e-9
    assert res.info["value_curve"][0] == pytest.approx(start, rel=1e-6, abs=1e-9)
