"""Shapley estimators that spend fewer value evaluations than permutation sampling.

Both reuse every coalition they evaluate instead of reading each one once:

* ``kernel_shap`` -- KernelSHAP (Lundberg & Lee 2017) with paired sampling (every coalition
  with its complement, Covert & Lee 2021). Coalitions are drawn with probability proportional
  to the Shapley kernel, so the weighted least squares has unit weights; the efficiency
  constraint ``sum(phi) = v(N) - v(empty)`` is solved exactly through the KKT system.
* ``stratified_kernel_shap`` -- the same paired regression stratified by coalition size, with
  one intercept per size (whatever depends on |S| alone cancels exactly) and pairs allocated
  to sizes by their measured residual spread (Neyman allocation).
* ``stratified_svarm`` -- Stratified SVARM (Kolpaczki et al. 2024): every sampled coalition
  updates one stratum mean of every player; sizes 0, 1, n-1, n are computed exactly.

No pairwise-surrogate control variate for permutation sampling: an antithetic permutation pair
already integrates every game of order <= 2 exactly (so does a paired KernelSHAP sample), so
a pairwise surrogate g has zero variance there and ``phi(g) + (v - g)`` on antithetic pairs
equals plain antithetic sampling, sample by sample (checked while building this module;
tests/test_estimators.py checks the identity behind it).

Each takes an evaluation ``budget`` (distinct coalitions sent to ``value_fn``, memoised through
``smpq.shapley.ValueCache``) and a seeded ``numpy.random.Generator``, and returns an
``Estimate`` with a standard error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smpq.errors import SmpqError
from smpq.shapley import Z95, ValueCache, ValueFn

__all__ = ["Estimate", "kernel_shap", "shapley_kernel_sizes", "stratified_kernel_shap",
           "stratified_svarm"]


@dataclass(eq=False)
class Estimate:
    """Shapley estimates, their standard errors and the evaluations they cost."""

    estimate: np.ndarray
    stderr: np.ndarray
    evaluations: int
    samples: int  # independent units behind stderr: coalition pairs or permutation pairs
    method: str
    value_full: float
    value_empty: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ci_low(self) -> np.ndarray:
        return self.estimate - Z95 * self.stderr

    @property
    def ci_high(self) -> np.ndarray:
        return self.estimate + Z95 * self.stderr


def _check(n_players: int, budget: int, minimum: int) -> tuple[int, int]:
    for name, x in (("n_players", n_players), ("budget", budget)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise SmpqError(f"{name} must be an int, got {x!r}")
    if n_players < 2:
        raise SmpqError(f"n_players must be >= 2, got {n_players}")
    if budget < minimum:
        raise SmpqError(f"budget={budget} is below the minimum of {minimum} evaluations")
    return int(n_players), int(budget)


def shapley_kernel_sizes(n: int) -> np.ndarray:
    """P(|S| = s) for s = 1..n-1 under the Shapley kernel: proportional to 1 / (s (n - s))."""
    s = np.arange(1, n)
    p = 1.0 / (s * (n - s))
    return p / p.sum()


def _draw(rng: np.random.Generator, n: int, sizes: np.ndarray) -> np.ndarray:
    """One uniformly random coalition of each size in ``sizes``: (len(sizes), n) bool."""
    ranks = rng.random((len(sizes), n)).argsort(axis=1).argsort(axis=1)
    return ranks < sizes[:, None]


def _seen(cache: ValueCache) -> set[bytes]:
    return set(ValueCache.entries_from_dict(cache.to_dict())) if len(cache) else set()


def _take_pairs(cache: ValueCache, seen: set[bytes], half: np.ndarray, budget: int) -> np.ndarray:
    """Evaluate pairs (S, N minus S) in draw order while their new coalitions fit the budget;
    returns the accepted halves. Seen coalitions are free, as resampling one should be."""
    spent, keep = cache.evaluations, 0
    for h in half:
        new = {k for k in (h.tobytes(), (~h).tobytes()) if k not in seen}
        if spent + len(new) > budget:
            break
        seen |= new
        spent += len(new)
        keep += 1
    taken = half[:keep]
    if keep:
        cache(np.concatenate([taken, ~taken]))
    return taken


def _constrained_lstsq(a: np.ndarray, b: np.ndarray, total: float) -> np.ndarray:
    """argmin phi^T a phi - 2 b^T phi subject to sum(phi) = total, via the KKT system."""
    n = a.shape[0]
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = a
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs = np.append(b, total)
    try:
        return np.linalg.solve(kkt, rhs)[:n]
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]


def kernel_shap(
    value_fn: ValueFn, n_players: int, budget: int, rng: np.random.Generator, *,
    groups: int = 20, batch_size: int = 256, cache: ValueCache | None = None,
) -> Estimate:
    """Paired KernelSHAP with exact efficiency; stderr by a delete-a-group jackknife over pairs.

    Draws pairs (S, N minus S) until ``budget`` distinct evaluations are spent (v(N) and v(empty)
    included); a pair whose coalitions were seen before is reused at no cost, as a sample drawn
    with replacement should be. Pass ``cache`` to share evaluations with another estimator.
    """
    n, budget = _check(n_players, budget, 4)
    cache = cache or ValueCache(value_fn, n, batch_size)
    ends = np.array([np.zeros(n, bool), np.ones(n, bool)])
    v_empty, v_full = (float(x) for x in cache(ends))
    p_size = shapley_kernel_sizes(n)
    seen = _seen(cache)
    rows: list[np.ndarray] = []
    draws, limit = 0, 50 * budget + 1000
    while cache.evaluations < budget - 1 and draws < limit:
        room = max(1, (budget - cache.evaluations) // 2)
        half = _draw(rng, n, rng.choice(np.arange(1, n), size=room, p=p_size))
        draws += room
        taken = _take_pairs(cache, seen, half, budget)
        rows.extend(np.stack([taken, ~taken], axis=1))
        if len(taken) < room:
            break
    if not rows:
        raise SmpqError(f"budget={budget} leaves no room for a coalition pair")
    masks = np.vstack(rows)
    z = masks.astype(float)
    y = cache(masks) - v_empty
    m = len(rows)
    # per-pair sufficient statistics: a = sum z z^T, b = sum z y over the pair's two rows
    zp = z.reshape(m, 2, n)
    yp = y.reshape(m, 2)
    a_tot = z.T @ z
    b_tot = z.T @ y
    phi = _constrained_lstsq(a_tot, b_tot, v_full - v_empty)
    g = min(groups, m)
    stderr = np.full(n, np.nan)
    if g >= 2:
        label = np.arange(m) % g
        jack = np.empty((g, n))
        for k in range(g):
            sel = label == k
            za, ya = zp[sel].reshape(-1, n), yp[sel].ravel()
            jack[k] = _constrained_lstsq(a_tot - za.T @ za, b_tot - za.T @ ya, v_full - v_empty)
        stderr = np.sqrt((g - 1) / g * np.sum((jack - jack.mean(0)) ** 2, axis=0))
    return Estimate(phi, stderr, cache.evaluations, m, "kernel_shap", v_full, v_empty,
                    {"pairs": m, "distinct": len(cache)})


def _cell_stats(masks: np.ndarray, y: np.ndarray, cell: np.ndarray, n_cells: int) -> tuple:
    """Per-cell count, sum x, sum y, sum x x^T, sum x y: what a within-size fit needs."""
    x = masks.astype(float)
    n = x.shape[1]
    cnt = np.bincount(cell, minlength=n_cells).astype(float)
    sx = np.zeros((n_cells, n))
    np.add.at(sx, cell, x)
    sy = np.bincount(cell, weights=y, minlength=n_cells)
    sxy = np.zeros((n_cells, n))
    np.add.at(sxy, cell, x * y[:, None])
    sxx = np.zeros((n_cells, n, n))
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(n_cells + 1))
    for c in range(n_cells):
        xc = x[order[bounds[c] : bounds[c + 1]]]
        sxx[c] = xc.T @ xc
    return cnt, sx, sy, sxx, sxy


def _within_fit(stats: tuple, weight: np.ndarray) -> np.ndarray:
    """Weighted least squares of y on x with a free intercept per size, sum(beta) = 0.

    ``stats`` are per-size sums (``_cell_stats``); ``weight`` is the per-size row weight.
    """
    cnt, sx, sy, sxx, sxy = stats
    ok = cnt > 0
    c = np.where(ok, cnt, 1.0)
    w = np.where(ok, weight, 0.0)
    a = np.einsum("k,kij->ij", w, sxx - sx[:, :, None] * sx[:, None, :] / c[:, None, None])
    b = np.einsum("k,ki->i", w, sxy - sx * (sy / c)[:, None])
    return _constrained_lstsq(a, b, 0.0)


def stratified_kernel_shap(
    value_fn: ValueFn, n_players: int, budget: int, rng: np.random.Generator, *,
    rounds: int = 4, pilot_pairs: int = 2, mix: float = 0.2, groups: int = 20,
    batch_size: int = 256,
) -> Estimate:
    """Size-stratified paired regression with Neyman allocation of pairs to sizes.

    Writing phi_i = (v(N) - v(empty)) / n + mean over sizes k = 1..n-1 of beta_ik, where beta_k
    is the least-squares slope of v on x among coalitions of size k (sum zero; exact, not an
    approximation), a part of v that depends on |S| only cancels exactly -- the variance that
    dominates collapsing and threshold games. Pairs (S, N minus S) are drawn per size class
    {k, n - k}; after ``pilot_pairs`` per class, ``rounds`` rounds give each class pairs in
    proportion to its residual spread / sqrt(k (n - k)) (Neyman; a share ``mix`` follows the
    Shapley kernel so no class starves). The slopes are pooled by weighted least squares with
    per-size intercepts and weights 1 / (m_k k (n - k)), so each size counts equally in the
    limit: consistent (ratio bias O(1/m)), efficient by construction. stderr: jackknife.
    """
    n = _check(n_players, 2, 2)[0]
    n_classes = n // 2
    _, budget = _check(n, budget, 2 + 2 * pilot_pairs * n_classes)
    if rounds < 1 or pilot_pairs < 2 or not 0 <= mix <= 1:
        raise SmpqError("need rounds >= 1, pilot_pairs >= 2 and 0 <= mix <= 1")
    cache = ValueCache(value_fn, n, batch_size)
    v_empty, v_full = (float(x) for x in cache(np.array([np.zeros(n, bool), np.ones(n, bool)])))
    seen = _seen(cache)
    ks = np.arange(1, n_classes + 1)  # class k holds sizes k and n - k
    kern = 1.0 / (ks * (n - ks))
    halves: list[np.ndarray] = []
    klass: list[np.ndarray] = []

    def sample(counts: np.ndarray) -> bool:
        sizes = np.repeat(ks, counts)
        sizes = sizes[rng.permutation(len(sizes))]
        taken = _take_pairs(cache, seen, _draw(rng, n, sizes), budget)
        halves.append(taken)
        klass.append(sizes[: len(taken)])
        return len(taken) == len(sizes)

    def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Coalitions (halves first, then complements), values, sizes, per-size weights."""
        h, c = np.concatenate(halves), np.concatenate(klass)
        masks = np.concatenate([h, ~h])
        size = masks.sum(axis=1)
        counts = np.bincount(c, minlength=n_classes + 1).astype(float)
        sizes = np.arange(n + 1)
        m_size = counts[np.minimum(sizes, n - sizes)] * np.where(2 * sizes == n, 2, 1)
        with np.errstate(divide="ignore"):
            w = np.where(m_size > 0, 1.0 / (m_size * sizes * (n - sizes)), 0.0)
        return masks, cache(masks), size, w

    sample(np.full(n_classes, pilot_pairs))
    for r in range(rounds + 3):  # the extra rounds spend what duplicates and rounding left over
        masks, y, size, w = data()
        beta = _within_fit(_cell_stats(masks, y, size, n + 1), w)
        resid = y - masks @ beta
        spread = np.zeros(n_classes)
        for j, k in enumerate(ks):
            for kk in {int(k), int(n - k)}:
                sel = size == kk
                if sel.sum() >= 2:
                    spread[j] += resid[sel].var(ddof=1)
        neyman = np.sqrt(spread * kern)
        share = mix * kern / kern.sum()
        if neyman.sum() > 0:
            share = share + (1 - mix) * neyman / neyman.sum()
        else:
            share = kern / kern.sum()
        room = (budget - cache.evaluations) // 2 // max(rounds - r, 1)
        if room < 1:
            break
        counts = np.floor(share * room).astype(np.int64)
        extra = rng.choice(n_classes, room - counts.sum(), p=share) if room > counts.sum() else []
        np.add.at(counts, extra, 1)
        if not sample(counts):
            break
    masks, y, size, w = data()
    m = len(masks) // 2
    g = max(1, min(groups, m))
    label = np.tile(np.arange(m) % g, 2)
    cells = _cell_stats(masks, y, label * (n + 1) + size, g * (n + 1))
    cells = tuple(a.reshape(g, n + 1, *a.shape[1:]) for a in cells)
    total = tuple(a.sum(axis=0) for a in cells)
    phi = (v_full - v_empty) / n + _within_fit(total, w)
    stderr = np.full(n, np.nan)
    if g >= 2:
        jack = np.empty((g, n))
        for k in range(g):
            jack[k] = _within_fit(tuple(t - a[k] for t, a in zip(total, cells, strict=True)), w)
        stderr = np.sqrt((g - 1) / g * np.sum((jack - jack.mean(0)) ** 2, axis=0))
    return Estimate(phi, stderr, cache.evaluations, m, "stratified_kernel_shap", v_full,
                    v_empty, {"pairs": m, "pairs_per_class": np.bincount(
                        np.concatenate(klass), minlength=n_classes + 1)[1:].tolist()})


def stratified_svarm(
    value_fn: ValueFn, n_players: int, budget: int, rng: np.random.Generator, *,
    batch_size: int = 256,
) -> Estimate:
    """Stratified SVARM: phi_i = mean over l of (E v(S + i) - E v(S)), S of size l without i.

    After the exact strata (v of the empty set, singletons, their complements and N: 2n + 2
    evaluations), coalitions A are drawn with |A| = s in 2..n-2, P(s) proportional to
    1 / min(s, n - s) (a simplification of the paper's size distribution), uniform given s; v(A)
    updates the "with i" mean of stratum s - 1 for every i in A and the "without i" mean of
    stratum s for every other player. A stratum nobody hit borrows the mean of all draws of its
    size (biased until every stratum has a draw). stderr from the per-stratum sample variances
    (strata are independent given their counts).
    """
    n, budget = _check(n_players, budget, 2 * n_players + 3)
    if n < 4:
        raise SmpqError("stratified_svarm needs n_players >= 4; use exact_shapley")
    cache = ValueCache(value_fn, n, batch_size)
    eye = np.eye(n, dtype=bool)
    exact = np.vstack([np.zeros(n, bool), np.ones(n, bool), eye, ~eye])
    vals = cache(exact)
    v_empty, v_full, v_one, v_all_but = vals[0], vals[1], vals[2 : n + 2], vals[n + 2 :]
    seen = _seen(cache)
    sizes = np.arange(2, n - 1)
    p_size = 1.0 / np.minimum(sizes, n - sizes)
    p_size /= p_size.sum()
    drawn: list[np.ndarray] = []
    draws, limit = 0, 50 * budget + 1000  # small games: seen coalitions are free, stop anyway
    while cache.evaluations < budget and draws < limit:
        room = min(budget - cache.evaluations, limit - draws)
        draws += room
        masks = _draw(rng, n, rng.choice(sizes, size=room, p=p_size))
        keep = 0
        spent = cache.evaluations
        for mask in masks:
            key = mask.tobytes()
            if key not in seen:
                if spent + 1 > budget:
                    break
                seen.add(key)
                spent += 1
            keep += 1
        drawn.append(masks[:keep])
        cache(masks[:keep])
        if keep < room:
            break
    a = np.concatenate(drawn) if drawn else np.zeros((0, n), bool)
    y = cache(a) if len(a) else np.zeros(0)
    x = a.astype(float)
    onehot = np.zeros((len(a), n + 1))
    onehot[np.arange(len(a)), a.sum(axis=1)] = 1.0
    # plus stratum l = s - 1 for members, minus stratum l = s for the others: (n, n + 1) tables
    stats = []
    for ind, shift in ((x, 1), (1.0 - x, 0)):
        c, s1, s2 = (ind.T @ (onehot * t[:, None]) for t in (np.ones_like(y), y, y * y))
        stats.append(tuple(np.roll(t, -shift, axis=1)[:, :n] for t in (c, s1, s2)))
    size_mean = (onehot * y[:, None]).sum(0) / np.maximum(onehot.sum(0), 1)
    means, variances = [], []
    for (c, s1, s2), shift in zip(stats, (1, 0), strict=True):
        fill = np.roll(size_mean, -shift)[:n][None, :].repeat(n, axis=0)
        mean = np.where(c > 0, s1 / np.maximum(c, 1), fill)
        var = np.where(c > 1, (s2 - c * mean**2) / np.maximum(c - 1, 1), 0.0)
        means.append(mean)
        variances.append(np.where(c > 0, np.maximum(var, 0) / np.maximum(c, 1), 0.0))
    plus, minus = means
    plus[:, 0], minus[:, 0] = v_one, v_empty
    plus[:, n - 1], minus[:, n - 1] = v_full, v_all_but
    minus[:, 1] = (v_one.sum() - v_one) / (n - 1)
    plus[:, n - 2] = (v_all_but.sum() - v_all_but) / (n - 1)
    var_sum = variances[0] + variances[1]
    var_sum[:, [0, n - 1]] = 0.0
    phi = (plus - minus).mean(axis=1)
    stderr = np.sqrt(var_sum.sum(axis=1)) / n
    return Estimate(phi, stderr, cache.evaluations, len(a), "stratified_svarm", float(v_full),
                    float(v_empty), {"draws": len(a)})
