"""Games of 30-60 players whose Shapley values are known in closed form (benchmark only).

* ``quadratic`` -- v = a.x + x^T B x / 2: phi_i = a_i + sum_j B_ij / 2. Order two: antithetic
  permutations and paired KernelSHAP are exact on it (a sanity row, not a contest).
* ``smooth`` -- quadratic plus sparse triple (Harsanyi) dividends K_T x_T: each split in three.
* ``voting`` -- weighted majority 1[w.x >= q]; phi by counting swings with a dynamic program
  over (coalition size, weight).
* ``collapse`` -- a value that collapses once fewer than t players remain,
  (a.x) 1[|x| >= t], plus symmetric threshold games 1[|x_A| >= t_A] on random blocks A and
  unanimity games 1[T subset of x]: the SMPQ situation where quantizing too many layers at
  once sends accuracy to chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Game", "collapse_game", "quadratic_game", "smooth_game", "voting_game",
           "voting_shapley"]


@dataclass(frozen=True)
class Game:
    family: str
    n: int
    value_fn: Callable[[np.ndarray], np.ndarray]
    truth: np.ndarray
    note: str


def quadratic_game(n: int, seed: int = 0, triples: int = 0) -> Game:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.0, 1.0, n)
    b = np.triu(rng.normal(0.0, 0.3, (n, n)) * (rng.random((n, n)) < 0.3), 1)
    b = b + b.T
    tri = np.array([rng.choice(n, 3, replace=False) for _ in range(triples)], dtype=np.int64)
    tri = tri.reshape(-1, 3)
    k = rng.normal(0.0, 1.0, len(tri))
    truth = a + b.sum(axis=1) / 2
    np.add.at(truth, tri.ravel(), np.repeat(k / 3, 3))

    def value_fn(masks: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(masks).astype(float)
        out = x @ a + 0.5 * np.einsum("bi,ij,bj->b", x, b, x)
        return out + (x[:, tri].prod(axis=2) @ k if len(tri) else 0.0)

    family = "smooth" if triples else "quadratic"
    note = (f"{n} players, uniform main effects, 30% of pairs N(0, 0.3)"
            + (f", {triples} triple dividends N(0, 1)" if triples else ""))
    return Game(family, n, value_fn, truth, note)


def smooth_game(n: int, seed: int = 0) -> Game:
    return quadratic_game(n, seed, triples=3 * n)


def voting_shapley(weights: np.ndarray, quota: int) -> np.ndarray:
    """Exact Shapley values of the weighted majority game (integer weights) by swing counting."""
    w = np.asarray(weights, dtype=np.int64)
    n, total = len(w), int(w.sum())
    phi = np.empty(n)
    coef = np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])
    for i in range(n):
        count = np.zeros((n, total + 1))  # count[s, t]: subsets of N minus i, size s, weight t
        count[0, 0] = 1.0
        for j in np.flatnonzero(np.arange(n) != i):
            count[1:, w[j]:] += count[:-1, : total + 1 - w[j]].copy()
        lo = max(quota - int(w[i]), 0)
        swings = count[:, lo:quota].sum(axis=1) if quota > lo else np.zeros(n)
        phi[i] = float(coef @ swings)
    return phi


def voting_game(n: int, seed: int = 0) -> Game:
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 21, n)
    w[: max(1, n // 10)] *= 3  # a few heavy players, like sensitive layers
    quota = int(0.6 * w.sum())

    def value_fn(masks: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(masks).astype(np.int64) @ w >= quota).astype(float)

    return Game("voting", n, value_fn, voting_shapley(w, quota),
                f"{n} players, weights 1..20 (10% tripled), quota 60% of the total")


def collapse_game(n: int, seed: int = 0) -> Game:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 1.0, n)
    t = int(0.7 * n)
    big = float(a.sum())
    truth = a * (n - t + 1) / n + (t - 1) * (big - a) / (n * (n - 1))
    blocks = [rng.choice(n, int(rng.integers(4, 9)), replace=False) for _ in range(4)]
    block_t = [int(rng.integers(2, len(bl))) for bl in blocks]
    block_c = rng.uniform(2.0, 6.0, len(blocks))
    for bl, c in zip(blocks, block_c, strict=True):
        truth[bl] += c / len(bl)
    unanim = [rng.choice(n, int(rng.integers(2, 5)), replace=False) for _ in range(6)]
    unanim_c = rng.uniform(1.0, 3.0, len(unanim))
    for u, c in zip(unanim, unanim_c, strict=True):
        truth[u] += c / len(u)

    def value_fn(masks: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(masks).astype(bool)
        out = (x @ a) * (x.sum(axis=1) >= t)
        for bl, tb, c in zip(blocks, block_t, block_c, strict=True):
            out = out + c * (x[:, bl].sum(axis=1) >= tb)
        for u, c in zip(unanim, unanim_c, strict=True):
            out = out + c * x[:, u].all(axis=1)
        return out

    return Game("collapse", n, value_fn, truth,
                f"{n} players, (a.x) 1[|x| >= {t}] + 4 block thresholds + 6 unanimity games")
