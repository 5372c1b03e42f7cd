"""Figures of the default allocator's search (engine): what a user looks at before a table.

* value vs evaluations: the best feasible value found after each evaluation, with the
  measured and predicted value of every policy the loop asked for;
* the interaction heatmap: the surrogate's deficit-pair coefficients between ladders
  (negative: two layers low together hurt more than each alone).

They read the engine's `contributions.json` fields (`value_curve`, `rounds`,
`interaction_matrix`) and share `smpq.report`'s pyplot-free figure helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from smpq.report import PathLike, _figure, _num, _save, _txt

__all__ = ["ENGINE_FIGURES", "plot_interactions", "plot_value_curve"]

ENGINE_FIGURES = {k: f"{k}.png" for k in ("value_curve", "interactions")}


def plot_value_curve(contributions: Mapping, path: PathLike) -> Path | None:
    """Best value found vs evaluations, and predicted vs measured per loop round."""
    curve = [_num(v) for v in contributions.get("value_curve") or []]
    if not curve:
        return None
    rounds = list(contributions.get("rounds") or [])
    fig, axes = _figure(7.5, 5.5, nrows=2)
    ax = axes[0]
    ax.plot(np.arange(1, len(curve) + 1), curve, color="C0", label="best feasible so far")
    for r in rounds:
        n = int(r["evaluations"])
        got = r["measured"]
        ax.scatter(np.arange(n - len(got) + 1, n + 1), got, s=10, color="C1", alpha=0.6,
                   label="loop policy (measured)")
    ax.set_xlabel("value evaluations (forward passes over the validation split)")
    ax.set_ylabel(_txt(contributions.get("value", "value")))
    ax.grid(alpha=0.3)
    ax.set_title("Best value found vs evaluations", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    keep = dict(zip(labels, handles, strict=True))
    ax.legend(list(keep.values()), list(keep), fontsize=8, loc="lower right")
    ax = axes[1]
    pred = [p for r in rounds for p in r["predicted"]]
    meas = [m for r in rounds for m in r["measured"]]
    if pred:
        ax.scatter(pred, meas, s=12, color="C2")
        lo, hi = min(pred + meas), max(pred + meas)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.set_xlabel("predicted by the surrogate")
    ax.set_ylabel("measured")
    ax.grid(alpha=0.3)
    r2 = _num(contributions.get("r2_cv"))
    ax.set_title(f"Loop policies: predicted vs measured (surrogate K-fold R^2 {r2:.3f})",
                 fontsize=10)
    return _save(fig, path)


def plot_interactions(contributions: Mapping, path: PathLike) -> Path | None:
    """Heatmap of the surrogate's pairwise coefficients between ladders (layer.w / layer.a)."""
    data = contributions.get("interaction_matrix") or {}
    labels = list(data.get("labels") or [])
    mat = np.asarray(data.get("matrix") or [], dtype=float)
    if not labels or mat.shape != (len(labels), len(labels)) or not np.any(mat):
        return None
    size = min(max(4.5, 0.32 * len(labels) + 2.5), 18.0)
    fig, axes = _figure(size + 1.0, size)
    ax = axes[0]
    lim = float(np.max(np.abs(mat))) or 1.0
    im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim)
    ticks = range(len(labels))
    fs = 7 if len(labels) > 20 else 8
    ax.set_xticks(ticks, [_txt(x) for x in labels], rotation=90, fontsize=fs)
    ax.set_yticks(ticks, [_txt(x) for x in labels], fontsize=fs)
    fig.colorbar(im, ax=ax, shrink=0.8, label="interaction of the two deficits")
    ax.set_title("Pairwise interactions (surrogate)", fontsize=10)
    return _save(fig, path)
