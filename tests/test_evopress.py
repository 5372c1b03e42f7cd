"""EvoPress's search (smpq.engine.evopress) on small synthetic games.

References: the optimum by enumerating every policy of the space and keeping those under the
limits; feasibility by recomputing totals from the cost rows; the returned value by calling
the game's value function again on the returned levels.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from smpq.engine.evopress import EvoConfig, evopress, initial_policy, level_switch, partner_groups
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError


def _game(seed: int, n_units: int = 5, n_levels: int = 4, share: float = 0.55):
    """A space with units of two or three sizes (some equal-cost partners), a binding size
    limit at `share` of the way from cheapest to richest, and a value that is additive in
    the levels plus pairwise interactions (noise-free)."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1.0, 2.0, 3.0], size=n_units)
    bits = np.array([2.0, 3.0, 4.0, 8.0][:n_levels])
    rows = tuple(s * bits for s in sizes)
    lo, hi = sum(r[0] for r in rows), sum(r[-1] for r in rows)
    space = PolicySpace(tuple(f"u{i}" for i in range(n_units)), ((n_levels,),) * n_units,
                        {"size": rows}, {}, {"size": lo + share * (hi - lo)}, ("w",))
    gain = np.cumsum(rng.uniform(0.2, 1.0, size=(n_units, n_levels)) * sizes[:, None], axis=1)
    pair = rng.normal(0.0, 0.15, size=(n_units, n_units))

    def full(levels: np.ndarray) -> float:
        lv = np.asarray(levels)
        add = sum(gain[u, lv[u]] for u in range(n_units))
        inter = sum(pair[u, v] * lv[u] * lv[v] / n_levels for u in range(n_units)
                    for v in range(u + 1, n_units))
        return float(add + inter)

    return space, full


class _Value:
    """The game's value; at n_blocks < full, plus a small deterministic perturbation that
    shrinks with the fidelity (a few blocks rank nearly, not exactly, as the whole text)."""

    def __init__(self, space: PolicySpace, full, blocks: int = 8):
        self.space, self.full, self.blocks = space, full, blocks
        self.calls: list[int | None] = []

    def __call__(self, choices: np.ndarray, n_blocks: int | None = None) -> np.ndarray:
        out = []
        for c in np.atleast_2d(choices):
            self.calls.append(n_blocks)
            v = self.full(self.space.levels(c[None])[0])
            if n_blocks is not None and n_blocks < self.blocks:
                v += 0.05 * np.sin(7.0 * float(np.dot(c, np.arange(1, len(c) + 1))) + n_blocks)
            out.append(v)
        return np.array(out)


def _price(n_blocks: int | None) -> int:
    return 100 * (8 if n_blocks is None else n_blocks)


def _brute(space: PolicySpace, full) -> tuple[float, int]:
    """(the best value over every policy that fits, how many fit)."""
    grid = np.array(list(itertools.product(*(range(g[0]) for g in space.grids))))
    ok = space.fits(grid)
    return max(full(lv) for lv in grid[ok]), int(ok.sum())


@pytest.mark.parametrize("seed", range(8))
def test_evopress_reaches_the_brute_force_optimum(seed):
    space, full = _game(seed)
    value = _Value(space, full)
    cap = 150 * _price(None)  # 150 full-evaluation equivalents; the space has 1,024 policies
    cfg = EvoConfig(offspring=8, stages=((1, 3), (None, 1)), block_tokens=cap, seed=seed)
    res = evopress(space, value, cfg, price=_price)
    best, n_feasible = _brute(space, full)
    assert res.value == pytest.approx(best, abs=1e-9)
    assert res.counts["full"] < n_feasible / 4  # found, not enumerated
    assert res.value == pytest.approx(full(res.levels), abs=1e-12)  # recomputed
    assert space.fits(res.choice[None])[0]
    assert res.block_tokens <= cap
    assert res.block_tokens == sum(_price(n) for n in value.calls)
    assert sum(res.counts.values()) == len(value.calls) == res.evaluations
    assert res.counts["full"] == value.calls.count(None)


def test_curve_is_best_so_far_and_ends_at_the_result():
    space, full = _game(3)
    res = evopress(space, _Value(space, full), EvoConfig(offspring=6, generations=15, seed=1),
                   price=_price)
    spent = [s for s, _ in res.curve]
    best = [v for _, v in res.curve]
    assert spent == sorted(spent) and best == sorted(best)
    assert best[-1] == res.value == max(res.history)
    assert res.generations == 15 and res.stopped == "generations"


@pytest.mark.parametrize("seed", range(30))
def test_level_switch_keeps_the_budget(seed):
    """From random feasible policies, every switch result fits (totals recomputed by hand),
    and with an equal-cost partner available it keeps the size total exactly."""
    rng = np.random.default_rng(seed)
    space, _ = _game(seed % 5, n_units=6, share=float(rng.uniform(0.2, 0.8)))
    rows = space.costs["size"]
    limit = space.limits["size"]
    partners = partner_groups(space)
    start = space.levels(space.random_maximal(rng, 1))[0]
    for _ in range(20):
        got = level_switch(space, start, rng, partners)
        if got is None:
            continue
        total = sum(r[k] for r, k in zip(rows, got, strict=True))
        assert total <= limit + 1e-9
        assert np.all((got >= 0) & (got <= space.tops))
        up = np.flatnonzero(got > start)
        assert len(up) == 1 and got[up[0]] == start[up[0]] + 1
        before = sum(r[k] for r, k in zip(rows, start, strict=True))
        down = np.flatnonzero(got < start)
        if len(down) == 1 and down[0] in partners[up[0]]:  # equal rows: the step costs say
            a, b = up[0], down[0]
            step_up = rows[a][got[a]] - rows[a][start[a]]
            step_down = rows[b][start[b]] - rows[b][got[b]]
            assert total == pytest.approx(before + step_up - step_down)
            if np.isclose(step_up, step_down):
                assert total == pytest.approx(before)  # EvoPress's exact switch
        start = got


def test_partner_groups_are_units_of_equal_cost_rows():
    rows = (np.array([1.0, 2.0]), np.array([3.0, 6.0]), np.array([1.0, 2.0]))
    sp = PolicySpace(("a", "b", "c"), ((2,),) * 3, {"size": rows}, {}, {"size": 6.0}, ("w",))
    assert partner_groups(sp) == [[2], [], [0]]


def test_start_is_uniform_when_it_meets_the_limit_else_lowered_from_one_level_above():
    rows = (np.array([2.0, 3.0, 4.0]),) * 4
    exact = PolicySpace(tuple("abcd"), ((3,),) * 4, {"size": rows}, {}, {"size": 12.0}, ("w",))
    assert initial_policy(exact, np.random.default_rng(0)).tolist() == [1, 1, 1, 1]
    loose = exact.with_limits({"size": 13.5})  # 3.375 bits: uniform 3 leaves slack
    seen = set()
    for s in range(10):  # from all-2 (16), three single-level drops reach 13 <= 13.5
        lv = initial_policy(loose, np.random.default_rng(s))
        assert lv.sum() == 5 and lv.max() <= 2 and loose.fits(loose.from_levels(lv))[0]
        seen.add(tuple(lv.tolist()))
    assert len(seen) > 1


def test_evaluation_cap_and_generation_cap_are_respected():
    space, full = _game(1)
    value = _Value(space, full)
    res = evopress(space, value, EvoConfig(offspring=8, evaluations=40, seed=0))
    assert res.evaluations == len(value.calls) <= 40 and res.stopped == "cap"


@pytest.mark.parametrize("kwargs", [
    {"stages": ((2, 4), (1, 2), (None, 1))}, {"stages": ((2, 4), (None, 2))},
    {"stages": ((2, 1), (4, 2), (None, 1))}, {"offspring": 0}, {"generations": None},
    {"block_tokens": 0},
])
def test_bad_configs_are_one_line_errors(kwargs):
    base = {"generations": 3} | kwargs
    with pytest.raises(SmpqError) as err:
        EvoConfig(**base)
    assert "\n" not in str(err.value)


def test_block_token_cap_needs_a_price():
    space, full = _game(0)
    with pytest.raises(SmpqError, match="block-token cap"):
        evopress(space, lambda c, n=None: np.zeros(len(c)), EvoConfig(block_tokens=10))


def test_config_round_trips():
    cfg = EvoConfig(offspring=5, stages=((2, 3), (None, 1)), generations=4, seed=2)
    assert EvoConfig.from_dict(cfg.to_dict()) == cfg


def test_a_cap_that_pays_for_part_of_a_generation_is_spent_not_left():
    """Full fidelity only (a split too small for the low stages): 8 children a generation
    but 5 evaluations' budget; the last generation is cut to what the cap pays for."""
    space, full = _game(2)
    value = _Value(space, full)
    cap = 5 * _price(None)
    res = evopress(space, value, EvoConfig(offspring=8, stages=((None, 1),), block_tokens=cap,
                                           seed=0), price=_price)
    assert res.block_tokens == cap and res.evaluations == 5
    assert res.value == pytest.approx(max(full(space.levels(c[None])[0])
                                          for c in np.atleast_2d(res.choice)), abs=1e-12)
    assert res.generations >= 1
