"""Shapley values of abstract cooperative games: exact enumeration and permutation sampling.

The engine knows nothing about networks: a game is ``n_players`` plus a batched value function
over boolean coalition masks. Permutation sampling follows Shapley-NAS: walk from the full set
to the empty set in a random order, crediting each player with the drop its removal causes.

Why one module past ~400 lines: the estimators share the value cache, the resumable sampler
state and the result type, and the truncation/tolerance rules only make sense read next to the
loop that applies them; split apart, each piece would import all the others.

Intervals (``ShapleyResult.ci_low/ci_high``) are meant to hold at their stated 95% for every
player with the default ten permutations, so they are not ``estimate +- 1.96 stderr``:

- Student t quantiles with m - 1 degrees of freedom (m i.i.d. samples; an antithetic pair is
  one sample), not 1.96;
- simple games (weighted majority, glove: every sampled marginal is one of two values a < b,
  ``two_values``): each player's marginal is a Bernoulli draw between them, and a weak player
  shows only zeros in many runs (pivotal in 13% of orders: 24% of runs at m = 10), which no
  variance estimate sees. Its interval is Agresti-Coull's with the t quantile q: q^2/2
  pseudo-samples at a and at b, then mean +- q sqrt(var / (m + q^2)). For plain sampling the
  coverage is exactly computable: >= 0.94 for every pivot probability and every m in 2..300
  (>= 0.95 for m <= 20), mean over p 0.96-0.98; antithetic pair means (0, 1/2, 1) use the
  same rule on [a, b] (measured: benchmarks/results/shapley_coverage.md);
- other games: a variance floor: a player's sample variance is raised to the moderated variance
  ``((m-1) s^2 + d0 s0^2) / (m - 1 + d0)`` (empirical Bayes, as limma's moderated t), with
  ``d0 = PRIOR_DF`` and ``s0^2`` the larger of the players' mean variance and
  ``max |marginal|^2 / n`` (the biggest effect seen, as if it were one player's in n). A player
  whose few marginals happened to be identical so gets a non-zero width; the floor fades like
  1/m. Only a game in which every sampled marginal is 0 (nothing to scale by) or a one-player
  game (one permutation, exact) gets zero width. With d0 = 4 the pooled coverage is >= 0.95
  on additive, pairwise, random, noisy-voting and collapse games; per player it is not
  guaranteed where marginals are mostly near 0 with rare large jumps but not exactly two
  values: measured 0.895 on the collapse game at 18 permutations, 0.915 on a noisy voting
  game with 5 antithetic pairs (docs/RELIABILITY.md);
- truncation (see ``ShapleyConfig``) credits 0 to players it never removes, so its estimates
  are biased: ``ShapleyResult.biased`` says so, and the interval is widened by the value the
  cut-off tail still held, which bounds the bias when v is monotone (each unseen marginal lies
  between 0 and that remainder). For non-monotone games no bound holds; trust the flag.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from smpq.errors import SmpqError

__all__ = [
    "PRIOR_DF", "Z95", "SamplerState", "ShapleyConfig", "ShapleyResult", "ValueCache", "ValueFn",
    "batched", "bounds", "conservative", "estimate_shapley", "exact_shapley", "half_widths",
    "intervals", "permutation_shapley", "standardise", "t95", "two_values",
]

log = logging.getLogger(__name__)

ValueFn = Callable[[np.ndarray], np.ndarray]
Z95 = 1.959963984540054  # two-sided 95% normal quantile (the large-sample limit of t95)
PRIOR_DF = 4.0  # pseudo degrees of freedom of the variance floor (see module docstring)
MAX_EXACT_PLAYERS = 20
_TO_STR = bytes.maketrans(b"\x00\x01", b"01")
_TO_KEY = bytes.maketrans(b"01", b"\x00\x01")


def batched(fn_single: Callable[[np.ndarray], float]) -> ValueFn:
    """Lift a one-mask value function to the batched ``(k, n) -> (k,)`` protocol."""

    @functools.wraps(fn_single)
    def value_fn(masks: np.ndarray) -> np.ndarray:
        return np.array([float(fn_single(m)) for m in masks], dtype=float)

    return value_fn


def _check_n(n_players: int, limit: int | None = None) -> int:
    if isinstance(n_players, bool) or not isinstance(n_players, (int, np.integer)):
        raise SmpqError(f"n_players must be an int, got {n_players!r}")
    if n_players < 1 or (limit is not None and n_players > limit):
        upper = f"..{limit}" if limit is not None else " or more"
        raise SmpqError(f"n_players must be 1{upper}, got {n_players}")
    return int(n_players)


def _call(value_fn: ValueFn, masks: np.ndarray) -> np.ndarray:
    """Call the user's value function on a private copy and insist on finite ``(k,)`` output."""
    out = np.asarray(value_fn(np.array(masks, dtype=bool, copy=True)), dtype=float)
    if out.shape != (masks.shape[0],):
        raise SmpqError(f"value_fn returned shape {out.shape}, expected ({masks.shape[0]},)")
    if not np.all(np.isfinite(out)):
        raise SmpqError("value_fn returned a non-finite value")
    return out


class ValueCache:
    """Memoised v(S) keyed by mask bytes; only misses count as evaluations.

    Misses are deduplicated and sent to ``value_fn`` in batches of at most ``batch_size``, so an
    expensive evaluator (a supernet forward pass) sees each coalition once.
    """

    def __init__(self, value_fn: ValueFn, n_players: int, batch_size: int = 64, *,
                 entries: Mapping[bytes, float] | None = None, evaluations: int = 0) -> None:
        self.value_fn = value_fn
        self.n_players = _check_n(n_players)
        if batch_size < 1:
            raise SmpqError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.evaluations = int(evaluations)
        self._store: dict[bytes, float] = dict(entries or {})

    def __len__(self) -> int:
        return len(self._store)

    def _keys(self, masks: np.ndarray) -> list[bytes]:
        masks = np.ascontiguousarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n_players:
            raise SmpqError(f"masks must have shape (k, {self.n_players}), got {masks.shape}")
        return [row.tobytes() for row in masks]

    def missing(self, masks: np.ndarray) -> int:
        """Distinct uncached coalitions among ``masks``: the worst-case cost of evaluating them."""
        return len({k for k in self._keys(masks) if k not in self._store})

    def peek(self, mask: np.ndarray) -> float | None:
        """Cached value of one coalition, or None; never evaluates."""
        return self._store.get(self._keys(np.asarray(mask, dtype=bool)[None, :])[0])

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        keys = self._keys(masks)
        todo = list(dict.fromkeys(k for k in keys if k not in self._store))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = np.frombuffer(b"".join(chunk), dtype=bool).reshape(len(chunk), -1)
            values = _call(self.value_fn, batch)
            self.evaluations += len(chunk)
            self._store.update(zip(chunk, values.tolist(), strict=True))
        return np.array([self._store[k] for k in keys], dtype=float)

    def to_dict(self) -> dict[str, float]:
        """Plain-JSON view: ``"0110..."`` coalition strings to values."""
        return {k.translate(_TO_STR).decode(): v for k, v in self._store.items()}

    @staticmethod
    def entries_from_dict(data: Mapping[str, float]) -> dict[bytes, float]:
        return {str(k).encode().translate(_TO_KEY): float(v) for k, v in data.items()}


@dataclass(frozen=True)
class ShapleyConfig:
    """How to estimate Shapley values; defaults follow Shapley-NAS (M=10 permutations).

    ``truncation`` is tau: a permutation stops once the value left to lose, measured from the
    empty set, is below tau of the game's range, v(S) - v(empty) < tau * (v(full) - v(empty)),
    and its remaining players get marginal 0 (Shapley-NAS: tau = 0.5; with v(empty) = 0 this is
    their v(S) < tau * v(full)). The rule does not change when v is shifted by a constant, so
    it works for values <= 0 (negative loss); it is off when v(full) <= v(empty). Truncated
    estimates are biased (``ShapleyResult.biased``). ``max_evaluations`` is a hard cap: a
    permutation (pair) is started only if its worst-case number of new evaluations still fits.
    ``tolerance`` stops once every sampling half-width (``half_widths``: t quantile, variance
    floor; truncation bias is left out, more samples do not shrink it) is below it, after at
    least ``min_permutations``.
    """

    method: str = "permutation"
    permutations: int = 10
    antithetic: bool = False
    truncation: float | None = None
    max_evaluations: int | None = None
    tolerance: float | None = None
    min_permutations: int = 4
    truncation_chunk: int = 8
    batch_size: int = 64
    seed: int | None = 0

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise SmpqError(f"ShapleyConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(x: object, low: int) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low

        def is_real(x: object, low: float, high: float) -> bool:
            ok = isinstance(x, (int, float, np.floating)) and not isinstance(x, bool)
            return ok and low < x <= high

        if self.method not in ("exact", "permutation"):
            fail("method", "'exact' or 'permutation'")
        for name, low in (("permutations", 1), ("min_permutations", 2),
                          ("truncation_chunk", 1), ("batch_size", 1)):
            if not is_int(getattr(self, name), low):
                fail(name, f"an int >= {low}")
        for name, low in (("max_evaluations", 1), ("seed", 0)):
            if getattr(self, name) is not None and not is_int(getattr(self, name), low):
                fail(name, f"None or an int >= {low}")
        if not isinstance(self.antithetic, bool):
            fail("antithetic", "a bool")
        if self.antithetic and self.permutations % 2:
            fail("permutations", "even with antithetic=True (pairs)")
        if self.truncation is not None and not is_real(self.truncation, 0.0, 1.0):
            fail("truncation", "None or a float tau in (0, 1]")
        if self.tolerance is not None and not is_real(self.tolerance, 0.0, 1e300):
            fail("tolerance", "None or a finite float > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapleyConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise SmpqError(f"unknown ShapleyConfig keys: {sorted(unknown)}")
        return cls(**data)


def _json_rng(obj: Any, decode: bool = False) -> Any:
    """Bit-generator states may hold arrays (MT19937, Philox): map them to/from plain JSON."""
    if isinstance(obj, dict):
        if decode and "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _json_rng(v, decode) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    return int(obj) if isinstance(obj, np.integer) else obj


def _fingerprint(config: ShapleyConfig) -> dict[str, Any]:
    """Config fields that change what a permutation produces; a resume must not change them.
    Truncated states also name the rule, so a state cut at the old tau * v(full) is refused."""
    out = {k: getattr(config, k) for k in ("antithetic", "truncation", "truncation_chunk")}
    if config.truncation is not None:
        out["truncation_rule"] = "range"
    return out


@dataclass(eq=False)
class SamplerState:
    """A checkpoint between permutations; resuming from it reproduces an uninterrupted run.

    ``cache`` is optional: without it the resumed run re-evaluates coalitions it had seen, so
    estimates match but ``evaluations`` grows. ``remainders`` (truncation only) holds, per
    permutation, the value its cut-off tail still held, on the tail's players (else 0), and
    ``tails`` how many players each permutation cut off.
    """

    n_players: int
    marginals: np.ndarray
    rng_state: dict[str, Any]
    evaluations: int = 0
    cache: dict[str, float] | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    remainders: np.ndarray | None = None
    tails: list[int] | None = None

    def to_dict(self, include_cache: bool = True) -> dict[str, Any]:
        out = {
            "n_players": self.n_players,
            "marginals": np.asarray(self.marginals, dtype=float).tolist(),
            "rng_state": _json_rng(self.rng_state),
            "evaluations": self.evaluations,
            "cache": dict(self.cache) if include_cache and self.cache is not None else None,
            "fingerprint": dict(self.fingerprint),
        }
        if self.remainders is not None:
            out["remainders"] = np.asarray(self.remainders, dtype=float).tolist()
            out["tails"] = [int(t) for t in self.tails or []]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplerState:
        try:
            n = _check_n(data["n_players"])
            marginals = np.array(data["marginals"], dtype=float).reshape(-1, n)
            rng_state = _json_rng(data["rng_state"], decode=True)
            rem = data.get("remainders")
            rem = None if rem is None else np.array(rem, dtype=float).reshape(-1, n)
            tails = None if rem is None else [int(t) for t in data["tails"]]
            if rem is not None and not len(rem) == len(tails) == len(marginals):
                raise ValueError("remainders, tails and marginals differ in length")
            return cls(n, marginals, rng_state, int(data["evaluations"]), data.get("cache"),
                       dict(data.get("fingerprint", {})), rem, tails)
        except (KeyError, TypeError, ValueError) as exc:
            raise SmpqError(f"malformed SamplerState: {exc}") from exc

    def generator(self) -> np.random.Generator:
        name = self.rng_state.get("bit_generator")
        bit_gen_cls = getattr(np.random, str(name), None)
        if bit_gen_cls is None or not isinstance(bit_gen_cls, type):
            raise SmpqError(f"unknown bit generator in SamplerState: {name!r}")
        bit_gen = bit_gen_cls()
        bit_gen.state = self.rng_state
        return np.random.Generator(bit_gen)


@dataclass(eq=False)
class ShapleyResult:
    """Estimates with honest uncertainty.

    ``marginals`` holds one row per permutation (truncated players are 0). With antithetic
    sampling rows ``2j`` and ``2j+1`` are a permutation and its reverse; they are correlated, so
    ``stderr`` treats each pair's average as ONE sample (see ``independent_samples``).
    ``stderr`` is the plain sample standard error; ``ci_low``/``ci_high`` are the 95% interval
    of the module docstring (t quantile, variance floor, truncation widening). ``biased``: some
    permutation was truncated, so marginals of its tail were never observed.
    """

    estimate: np.ndarray
    stderr: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    n_samples: np.ndarray
    evaluations: int
    permutations: int
    value_full: float | None
    value_empty: float | None
    marginals: np.ndarray
    antithetic: bool = False
    stop_reason: str = "permutations"
    state: SamplerState | None = field(default=None, repr=False)
    biased: bool = False

    def independent_samples(self) -> np.ndarray:
        """i.i.d. rows: marginals, or antithetic pair means."""
        return _independent(self.marginals, self.antithetic)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (NaN/inf become None); ``state`` is left out, save it on its own."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state"}
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = np.where(np.isfinite(value), value, None).tolist()
        return out


def _independent(marginals: np.ndarray, antithetic: bool) -> np.ndarray:
    if antithetic and len(marginals):
        return marginals.reshape(-1, 2, marginals.shape[1]).mean(axis=1)
    return marginals


def _stderr(samples: np.ndarray) -> np.ndarray:
    m = samples.shape[0]
    if m < 2:
        return np.full(samples.shape[1], np.nan)
    return samples.std(axis=0, ddof=1) / math.sqrt(m)


@functools.lru_cache(maxsize=256)
def t95(df: float) -> float:
    """Two-sided 95% Student t quantile with ``df`` degrees of freedom (``Z95`` as df -> inf)."""
    from scipy.special import stdtrit  # lazy: importing smpq stays light

    if not df > 0:
        raise SmpqError(f"degrees of freedom must be > 0, got {df}")
    return float(stdtrit(df, 0.975))


def two_values(marginals: np.ndarray) -> tuple[float, float] | None:
    """(a, b) when every sampled marginal (all players, all permutations) is one of two values
    a < b, as in a simple game (weighted majority, glove: marginals 0 or 1); else None. Equal
    up to 1e-9 of b - a, so accuracy differences that agree to rounding count as one value."""
    x = np.asarray(marginals, dtype=float)
    if x.size == 0:
        return None
    a, b = float(x.min()), float(x.max())
    tol = 1e-9 * (b - a)
    if not b - a > 0 or not np.all((x - a <= tol) | (b - x <= tol)):
        return None
    return a, b


def _floored_half_widths(samples: np.ndarray) -> np.ndarray:
    """t quantile with m - 1 degrees of freedom on the floored variance (module docstring)."""
    m, n = samples.shape
    var = samples.var(axis=0, ddof=1)
    prior = max(float(var.mean()), float(np.abs(samples).max()) ** 2 / n)
    d = m - 1
    var = np.maximum(var, (d * var + PRIOR_DF * prior) / (d + PRIOR_DF))
    return t95(d) * np.sqrt(var / m)


def _agresti_coull(samples: np.ndarray, support: tuple[float, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Agresti-Coull with the t quantile q: add q^2/2 pseudo-samples at each end of the support
    [a, b], then mean +- q sqrt(var / (m + q^2)) on the augmented sample (population variance).
    For 0/1 rows that is the binomial Agresti-Coull interval; for antithetic pair means (0,
    1/2, 1) the same rule on [a, b]. Widened to contain the sample mean."""
    m = samples.shape[0]
    a, b = support
    q = t95(m - 1)
    w, total = q * q / 2, m + q * q
    center = (samples.sum(axis=0) + w * (a + b)) / total
    ss = ((samples - center) ** 2).sum(axis=0) + w * ((a - center) ** 2 + (b - center) ** 2)
    half = q * np.sqrt(ss / total / total)
    mean = samples.mean(axis=0)
    return np.minimum(center - half, mean), np.maximum(center + half, mean)


def bounds(samples: np.ndarray, support: tuple[float, float] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """95% interval (low, high) for the column means of i.i.d. rows ``samples`` (m, n).

    ``support``: the two values every marginal takes (``two_values``), so each player's sample
    is a Bernoulli draw between them and the interval is Agresti-Coull's (t quantile). Else the
    t interval on the floored variance. NaN for m < 2, except in a one-player game, where every
    permutation is the same and the estimate is exact."""
    samples = np.asarray(samples, dtype=float)
    m, n = samples.shape
    mean = samples.mean(axis=0) if m else np.full(n, np.nan)
    if n == 1 and m >= 1:
        return mean, mean.copy()
    if m < 2:
        return np.full(n, np.nan), np.full(n, np.nan)
    if support is not None:
        return _agresti_coull(samples, support)
    half = _floored_half_widths(samples)
    return mean - half, mean + half


def half_widths(samples: np.ndarray, support: tuple[float, float] | None = None) -> np.ndarray:
    """Largest distance from the column mean to either end of ``bounds`` (NaN for m < 2)."""
    samples = np.asarray(samples, dtype=float)
    low, high = bounds(samples, support)
    mean = samples.mean(axis=0) if samples.shape[0] else low
    return np.maximum(mean - low, high - mean)


def intervals(marginals: np.ndarray, antithetic: bool = False,
              remainders: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ci_low, ci_high) around the mean of per-permutation ``marginals`` (antithetic pairs
    averaged into one sample; Agresti-Coull when the marginals take two values, see
    ``bounds``). ``remainders``: per permutation, the value the truncated tail held on its
    players; the interval grows by their mean, in the remainders' direction."""
    marginals = np.asarray(marginals, dtype=float)
    low, high = bounds(_independent(marginals, antithetic), two_values(marginals))
    if remainders is not None and len(remainders):
        rem = np.asarray(remainders, dtype=float)
        low, high = low + np.minimum(rem, 0).mean(axis=0), high + np.maximum(rem, 0).mean(axis=0)
    return low, high


def exact_shapley(value_fn: ValueFn, n_players: int, batch_size: int = 4096) -> ShapleyResult:
    """Shapley values by enumerating all 2^n coalitions with weights |S|!(n-|S|-1)!/n!."""
    n = _check_n(n_players, MAX_EXACT_PLAYERS)
    if batch_size < 1:
        raise SmpqError(f"batch_size must be >= 1, got {batch_size}")
    total = 1 << n
    bits = np.arange(n)
    values = np.empty(total, dtype=float)
    for start in range(0, total, batch_size):
        idx = np.arange(start, min(start + batch_size, total))
        values[idx] = _call(value_fn, ((idx[:, None] >> bits) & 1).astype(bool))
    idx = np.arange(total)
    sizes = np.zeros(total, dtype=np.int64)
    for i in range(n):
        sizes += (idx >> i) & 1
    weights = np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])
    estimate = np.empty(n)
    for i in range(n):
        without = idx[((idx >> i) & 1) == 0]
        gain = values[without | (1 << i)] - values[without]
        estimate[i] = np.sum(weights[sizes[without]] * gain)
    zeros = np.zeros(n)
    return ShapleyResult(
        estimate, zeros, estimate.copy(), estimate.copy(), np.full(n, total // 2), total, 0,
        float(values[-1]), float(values[0]), np.empty((0, n)), False, "exact",
    )


def _chain(perm: np.ndarray) -> np.ndarray:
    """Masks S_0=N, S_1=N minus perm[0], ..., S_n=empty: the removal path of one permutation."""
    rank = np.empty(len(perm), dtype=np.int64)
    rank[perm] = np.arange(len(perm))
    return rank[None, :] >= np.arange(len(perm) + 1)[:, None]


def _marginals_truncated(cache: ValueCache, perm: np.ndarray, tau: float,
                         chunk: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Walk the chain in chunks; the player whose removal takes v(S) - v(empty) below
    tau * (v(N) - v(empty)) keeps its drop, the rest of the permutation gets 0 (Shapley-NAS
    early truncation on the game's range). Returns the row, the value the cut-off tail still
    held (v(S) - v(empty), on the tail's players) and the tail's length."""
    masks = _chain(perm)
    n = len(perm)
    row, rem = np.zeros(n), np.zeros(n)
    prev, empty = (float(x) for x in cache(masks[[0, n]]))
    span = prev - empty
    threshold = empty + tau * span if span > 0 else -math.inf  # no range: walk it all
    for start in range(1, n + 1, chunk):
        for offset, value in enumerate(cache(masks[start : start + chunk]).tolist()):
            at = start - 1 + offset
            row[perm[at]] = prev - value
            prev = value
            if value < threshold:
                tail = perm[at + 1 :]
                rem[tail] = value - empty
                return row, rem, len(tail)
    return row, rem, 0


def _marginals(cache: ValueCache, perms: list[np.ndarray], config: ShapleyConfig
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    if config.truncation is not None:
        out = [_marginals_truncated(cache, p, config.truncation, config.truncation_chunk)
               for p in perms]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
    values = cache(np.vstack([_chain(p) for p in perms])).reshape(len(perms), -1)
    rows = []
    for p, v in zip(perms, values, strict=True):
        row = np.empty(len(p))
        row[p] = v[:-1] - v[1:]
        rows.append(row)
    return rows, [], []


def _tolerance_met(rows: list[np.ndarray], config: ShapleyConfig) -> bool:
    if config.tolerance is None or len(rows) < config.min_permutations:
        return False
    rows_ = np.asarray(rows)
    half = half_widths(_independent(rows_, config.antithetic), two_values(rows_))
    return bool(np.all(half < config.tolerance))  # NaN (one sample) compares False


def permutation_shapley(
    value_fn: ValueFn, n_players: int, config: ShapleyConfig | None = None,
    rng: np.random.Generator | None = None, state: SamplerState | None = None, *,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Callable[[SamplerState], None] | None = None,
) -> ShapleyResult:
    """Monte Carlo permutation estimate (Shapley-NAS style, removal from the full set).

    Without truncation each permutation's whole chain goes to the evaluator as one batch; with
    truncation it is walked in ``truncation_chunk`` pieces. Pass ``state`` (e.g. the last one
    given to ``checkpoint``, which is called after each permutation or antithetic pair) to
    continue a killed run: the final result equals the uninterrupted one. ``rng`` overrides
    ``config.seed``; ``progress(done, config.permutations)`` is called after each step.
    """
    config = config or ShapleyConfig()
    n = _check_n(n_players)
    if config.method != "permutation":
        raise SmpqError("permutation_shapley needs method='permutation'; use estimate_shapley")
    if state is not None and rng is not None:
        raise SmpqError("pass either rng or state, not both")
    if state is not None and (state.n_players, state.fingerprint) != (n, _fingerprint(config)):
        raise SmpqError(f"cannot resume a SamplerState for n={state.n_players}, "
                        f"{state.fingerprint} with n={n}, {_fingerprint(config)}")
    truncated = config.truncation is not None
    rems: list[np.ndarray] = []
    tails: list[int] = []
    if state is not None:
        rng, rows = state.generator(), list(np.asarray(state.marginals, float).reshape(-1, n))
        if truncated:
            if state.remainders is None and rows:
                raise SmpqError("cannot resume a truncated run from a state without remainders")
            rems = list(np.asarray(state.remainders, float).reshape(-1, n)) if rows else []
            tails = list(state.tails or [])
        entries = ValueCache.entries_from_dict(state.cache or {})
        cache = ValueCache(value_fn, n, config.batch_size, entries=entries,
                           evaluations=state.evaluations)
    else:
        rng = rng if rng is not None else np.random.default_rng(config.seed)
        rows, cache = [], ValueCache(value_fn, n, config.batch_size)

    def snapshot() -> SamplerState:
        return SamplerState(n, np.array(rows, dtype=float).reshape(-1, n),
                            rng.bit_generator.state, cache.evaluations, cache.to_dict(),
                            _fingerprint(config),
                            np.array(rems, dtype=float).reshape(-1, n) if truncated else None,
                            list(tails) if truncated else None)

    stop_reason = "permutations"
    while len(rows) < config.permutations:
        if _tolerance_met(rows, config):
            stop_reason = "tolerance"
            break
        before = rng.bit_generator.state
        perm = rng.permutation(n)
        perms = [perm, perm[::-1].copy()] if config.antithetic else [perm]
        if config.max_evaluations is not None:
            cost = cache.missing(np.vstack([_chain(p) for p in perms]))
            if cache.evaluations + cost > config.max_evaluations:
                rng.bit_generator.state = before  # so a resume with a bigger budget continues here
                stop_reason = "max_evaluations"
                break
        new_rows, new_rems, new_tails = _marginals(cache, perms, config)
        rows.extend(new_rows)
        rems.extend(new_rems)
        tails.extend(new_tails)
        if checkpoint is not None:
            checkpoint(snapshot())
        if progress is not None:
            progress(len(rows), config.permutations)
    if not rows:
        raise SmpqError(f"max_evaluations={config.max_evaluations} is below one permutation's cost")
    log.debug("permutation_shapley stopped (%s) after %d permutations, %d evaluations",
              stop_reason, len(rows), cache.evaluations)
    marginals = np.array(rows, dtype=float)
    estimate = marginals.mean(axis=0)
    low, high = intervals(marginals, config.antithetic, np.array(rems) if rems else None)
    return ShapleyResult(
        estimate, _stderr(_independent(marginals, config.antithetic)), low, high,
        np.full(n, len(rows)), cache.evaluations, len(rows),
        cache.peek(np.ones(n, dtype=bool)), cache.peek(np.zeros(n, dtype=bool)),
        marginals, config.antithetic, stop_reason, snapshot(), any(t > 0 for t in tails),
    )


def estimate_shapley(
    value_fn: ValueFn, n_players: int, config: ShapleyConfig | None = None, **kwargs: Any
) -> ShapleyResult:
    """Dispatch on ``config.method``; keyword arguments go to ``permutation_shapley``."""
    config = config or ShapleyConfig()
    if config.method == "exact":
        return exact_shapley(value_fn, n_players, batch_size=config.batch_size)
    return permutation_shapley(value_fn, n_players, config, **kwargs)


def standardise(values: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Z-score (population std) within each group, so layers with big accuracy swings don't
    dominate the alpha update; a constant group becomes zeros, ungrouped entries pass through."""
    values = np.asarray(values, dtype=float)
    out = values.copy()
    seen = np.zeros(values.shape[0], dtype=bool)
    for group in groups:
        idx = np.asarray(group, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            continue
        if idx.min() < 0 or idx.max() >= values.shape[0]:
            raise SmpqError(f"group index out of range 0..{values.shape[0] - 1}: {idx.tolist()}")
        if seen[idx].any() or len(np.unique(idx)) != idx.size:
            raise SmpqError(f"groups overlap at indices {idx[seen[idx]].tolist() or idx.tolist()}")
        seen[idx] = True
        x = values[idx]
        std = x.std()
        scale = max(1.0, float(np.max(np.abs(x))))
        out[idx] = 0.0 if std <= 1e-12 * scale else (x - x.mean()) / std
    return out


def conservative(result: ShapleyResult, k: float = 1.0) -> np.ndarray:
    """Shapley-NAS score: mean minus k * std of the per-permutation marginals (np.std, ddof=0,
    truncated zeros included) -- the spread of the marginals, not the stderr of the mean; it
    penalises players whose contribution is erratic across coalitions."""
    if result.marginals.shape[0] == 0:
        raise SmpqError("conservative() needs sampled marginals; exact results have none")
    return result.estimate - k * result.marginals.std(axis=0)
