"""Shapley-guided evolution (engine.guided) against brute force on small LLM-like spaces."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from smpq.engine.guided import GuidedConfig, guided_search, switch_moves
from smpq.engine.space import PolicySpace
from smpq.errors import SmpqError

L = 6  # transformer blocks of the pretend model; one unit per block


def llm_like(n_units: int = 6, levels: int = 4, avg: float = 1.5, seed: int = 0
             ) -> PolicySpace:
    """Units of two sizes with levels 0..levels-1 costing size * (level + 2) bits, budget at
    `avg` levels on average (binding)."""
    sizes = np.where(np.arange(n_units) % 2 == 0, 1.0, 2.0)
    rows = tuple(s * (np.arange(levels) + 2.0) for s in sizes)
    limit = float(sizes.sum() * (avg + 2.0))
    return PolicySpace(tuple(f"u{u}" for u in range(n_units)), ((levels,),) * n_units,
                       {"size": rows}, limits={"size": limit})


class Game:
    """Additive per-level gains plus pairwise interactions of the units' deficits (quantization
    errors compound, as in LLMs) with some irregular pair terms; a cheap low fidelity (value
    plus a fixed distortion); block-token accounting."""

    def __init__(self, space: PolicySpace, seed: int = 3, tokens: int = 4, blocks: int = 8):
        rng = np.random.default_rng(seed)
        n, k = space.n_units, space.n_choices(0)
        self.main = np.cumsum(rng.uniform(0, 1, (n, k)), axis=1)
        d = (k - 1 - np.arange(k)) / (k - 1)  # deficit of each level
        beta = -rng.uniform(0, 0.6, (n, n))
        self.pair = (beta[:, :, None, None] * d[None, None, :, None] * d[None, None, None, :]
                     + rng.normal(0, 0.05, (n, n, k, k)))
        self.distort = rng.normal(0, 0.05, (n, k))
        self.tokens, self.blocks = tokens, blocks
        self.block_tokens = 0
        self.calls = 0

    def exact(self, c: np.ndarray) -> float:
        c = np.asarray(c)
        n = len(c)
        v = self.main[np.arange(n), c].sum()
        for i, j in itertools.combinations(range(n), 2):
            v += self.pair[i, j, c[i], c[j]]
        return float(v)

    def __call__(self, choices: np.ndarray, n_blocks: int | None = None) -> np.ndarray:
        out = []
        for c in np.atleast_2d(choices):
            self.calls += 1
            nb = self.blocks if n_blocks is None else n_blocks
            self.block_tokens += nb * self.tokens * L
            v = self.exact(c)
            if n_blocks is not None:
                v += self.distort[np.arange(len(c)), c].sum()
            out.append(v)
        return np.array(out)


def brute_force(space: PolicySpace, game: Game) -> float:
    allp = np.array(list(itertools.product(*(range(space.n_choices(u))
                                             for u in range(space.n_units)))))
    ok = allp[space.fits(allp)]
    return max(game.exact(c) for c in ok)


def test_switch_moves_are_exactly_the_feasible_equal_size_switches():
    space = llm_like()
    rng = np.random.default_rng(0)
    for _ in range(20):
        lv = rng.integers(0, 4, space.n_units)
        if not space.fits(lv[None])[0]:
            continue
        got = {tuple(m) for m in switch_moves(space, lv).tolist()}
        want = set()
        for u, v in itertools.permutations(range(space.n_units), 2):
            # equal sizes (same parity) among the partners that can step down; any partner
            # when there is none
            downs = [w for w in range(space.n_units) if w != u and lv[w] > 0]
            same = [w for w in downs if w % 2 == u % 2]
            if lv[u] == 3 or v not in (same or downs):
                continue
            c = lv.copy()
            c[u] += 1
            c[v] -= 1
            if space.fits(c[None])[0]:
                want.add((u, v))
        assert got == want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guided_search_reaches_the_brute_force_optimum(seed):
    space = llm_like(seed=seed)
    game = Game(space, seed=seed + 10)
    start = np.full(space.n_units, 1, np.int64)  # uniform at level 1 fits avg 1.5
    best = brute_force(space, game)
    full = game.tokens * game.blocks * L
    res = guided_search(space, game, start, GuidedConfig(block_tokens=400 * full, seed=seed,
                                                         patience=40))
    assert space.fits(np.array(res.choice)[None])[0]
    assert res.value == pytest.approx(game.exact(np.array(res.choice)), abs=1e-12)
    assert res.value == pytest.approx(best, abs=1e-9)


def test_guided_search_never_ends_below_its_start_and_respects_the_budget():
    space = llm_like(n_units=8, levels=4)
    game = Game(space, seed=5)
    start = np.full(space.n_units, 1, np.int64)
    full = game.tokens * game.blocks * L
    res = guided_search(space, game, start, GuidedConfig(block_tokens=6 * full, seed=0))
    assert res.value >= game.exact(start) - 1e-12
    assert res.block_tokens == game.block_tokens
    assert res.block_tokens <= 6 * full + full  # at most one generation's overrun? none here
    curve = [v for _, v in res.curve]
    assert curve == sorted(curve)


def test_low_fidelity_screening_is_cheaper_than_full_only():
    space = llm_like(n_units=8)
    budget = 30 * 4 * 8 * L
    a, b = Game(space, seed=7), Game(space, seed=7)
    ra = guided_search(space, a, np.ones(8, np.int64), GuidedConfig(block_tokens=budget))
    rb = guided_search(space, b, np.ones(8, np.int64),
                       GuidedConfig(block_tokens=budget, screen_blocks=None))
    assert ra.evaluations.get("2", 0) > 0 and "2" not in rb.evaluations
    assert sum(ra.evaluations.values()) > sum(rb.evaluations.values())


def test_guided_search_resumes_to_the_same_policy(tmp_path):
    space = llm_like(n_units=8)
    ckpt = tmp_path / "guided.json"
    budget = 40 * 4 * 8 * L
    start = np.ones(8, np.int64)
    ref = guided_search(space, Game(space, seed=9), start, GuidedConfig(block_tokens=budget))

    class Dying(Game):
        def __call__(self, choices, n_blocks=None):
            if self.calls >= 60:
                raise KeyboardInterrupt
            return super().__call__(choices, n_blocks)

    with pytest.raises(KeyboardInterrupt):
        guided_search(space, Dying(space, seed=9), start, GuidedConfig(block_tokens=budget),
                      checkpoint=ckpt)
    assert json.loads(ckpt.read_text())["memo"]
    again = Game(space, seed=9)
    res = guided_search(space, again, start, GuidedConfig(block_tokens=budget),
                        checkpoint=ckpt, resume=True)
    assert res.choice == ref.choice and res.value == ref.value
    assert again.calls < 60 + ref.generations * 10  # the replayed part was not re-measured
    assert again.calls < Game(space, seed=9).calls + sum(ref.evaluations.values())


def test_guided_config_and_start_are_checked():
    space = llm_like()
    with pytest.raises(SmpqError, match="survivors"):
        GuidedConfig(block_tokens=1, offspring=2, survivors=3)
    with pytest.raises(SmpqError, match="budget"):
        guided_search(space, Game(space), np.full(space.n_units, 3, np.int64),
                      GuidedConfig(block_tokens=10))
