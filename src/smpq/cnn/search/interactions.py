"""How much of a policy table's value do per-layer choices explain alone, and with pairs?

Every allocator in the field sums independent per-layer scores, i.e. it assumes

    additive:  v(policy) = b + sum_l f_l(k_l)
    pairwise:  v(policy) = b + sum_l f_l(k_l) + sum_{l<m} g_lm(k_l, k_m)

Both are linear in one-hot features of the choices, fitted by least squares (the minimum-norm
solution, since one-hot blocks are collinear with the intercept); when there are fewer
training policies than features, a small ridge term makes the fit well posed. R^2 is
reported in sample (fit on every policy), and on held-out policies after fitting the rest:
the gap between the two models is the share of the variance that interactions explain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
from scipy import sparse

from smpq.cnn.search.oracle import PolicyTable
from smpq.errors import SmpqError
from smpq.surrogate import r2_score

__all__ = ["FitReport", "InteractionReport", "design_matrix", "interaction_analysis"]


@dataclass(frozen=True)
class FitReport:
    r2_all: float  # fit and scored on every policy
    r2_train: float  # fit on the training part, scored there
    r2_test: float  # same fit, scored on the held-out part (nan without one)
    n_features: int
    ridge: float  # the ridge weight used on the training fit (0 = plain least squares)


@dataclass(frozen=True)
class InteractionReport:
    n_policies: int
    n_train: int
    n_test: int
    additive: FitReport
    pairwise: FitReport

    @property
    def interaction_share(self) -> float:
        """Variance explained by the pairwise terms beyond the additive ones (in sample)."""
        return self.pairwise.r2_all - self.additive.r2_all

    def to_dict(self) -> dict:
        def clean(d):
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in d.items()}

        return {"n_policies": self.n_policies, "n_train": self.n_train, "n_test": self.n_test,
                "additive": clean(asdict(self.additive)),
                "pairwise": clean(asdict(self.pairwise)),
                "interaction_share": self.interaction_share}


def design_matrix(choices: np.ndarray, n_choices: int, pairwise: bool) -> sparse.csr_matrix:
    """Intercept, one-hot per layer, and (pairwise) one-hot per pair of layers' choices."""
    choices = np.asarray(choices, dtype=np.int64)
    n, layers = choices.shape
    cols = [np.zeros((n, 1), dtype=np.int64)]
    offset = 1
    for li in range(layers):
        cols.append(offset + choices[:, li : li + 1])
        offset += n_choices
    if pairwise:
        for a, b in combinations(range(layers), 2):
            cols.append(offset + (choices[:, a] * n_choices + choices[:, b])[:, None])
            offset += n_choices * n_choices
    idx = np.concatenate(cols, axis=1)
    rows = np.repeat(np.arange(n), idx.shape[1])
    data = np.ones(idx.size)
    return sparse.csr_matrix((data, (rows, idx.ravel())), shape=(n, offset))


def _fit(x: sparse.csr_matrix, y: np.ndarray, ridge: float) -> np.ndarray:
    gram = (x.T @ x).toarray()
    rhs = x.T @ y
    if ridge > 0:
        lam = ridge * max(float(np.mean(np.diag(gram))), 1e-12)
        return np.linalg.solve(gram + lam * np.eye(len(gram)), rhs)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


_r2 = r2_score  # one definition of R^2 (smpq.surrogate)


def _report(x: sparse.csr_matrix, y: np.ndarray, train: np.ndarray, ridge: float) -> FitReport:
    f = x.shape[1]
    beta_all = _fit(x, y, ridge if len(y) < f else 0.0)
    r2_all = _r2(y, x @ beta_all)
    lam = ridge if train.sum() < f else 0.0
    beta = _fit(x[train], y[train], lam)
    test = ~train
    r2_test = _r2(y[test], x[test] @ beta) if test.sum() >= 2 else math.nan
    return FitReport(r2_all, _r2(y[train], x[train] @ beta), r2_test, f, lam)


def interaction_analysis(
    table: PolicyTable | Mapping,
    *,
    mask: np.ndarray | None = None,
    holdout: float = 0.25,
    ridge: float = 1e-6,
    seed: int = 0,
) -> InteractionReport:
    """R^2 of the additive and pairwise models of the table's values (optionally a subset)."""
    if not isinstance(table, PolicyTable):
        table = PolicyTable.from_dict(table)
    if not 0 <= holdout < 1:
        raise SmpqError(f"holdout must be in [0, 1), got {holdout}")
    if not ridge > 0:
        raise SmpqError(f"ridge must be positive, got {ridge}")
    choices, y = table.choices, np.asarray(table.values, dtype=float)
    if mask is not None:
        choices, y = choices[mask], y[mask]
    if len(y) < 2:
        raise SmpqError("the interaction analysis needs at least two policies")
    if not np.all(np.isfinite(y)):
        raise SmpqError("the table holds non-finite values")
    k = len(table.pairs)
    rng = np.random.default_rng(seed)
    train = np.ones(len(y), dtype=bool)
    n_test = int(round(holdout * len(y)))
    if n_test >= 2:
        train[rng.choice(len(y), n_test, replace=False)] = False
    add = _report(design_matrix(choices, k, False), y, train, ridge)
    pair = _report(design_matrix(choices, k, True), y, train, ridge)
    return InteractionReport(len(y), int(train.sum()), int((~train).sum()), add, pair)
