"""Search report: PNG figures and a self-contained ``report.html``, built from plain data.

Every function reads the JSON-able dicts a search stores (policy, contributions, comparison,
budget), so a report can be rebuilt from files alone. Matplotlib is imported lazily and only its
Agg canvas is used (no pyplot): ``import smpq`` stays lean, and no global backend or figure
state is touched, so reports can be drawn headless, in threads, or inside a notebook session.

Why one module past ~400 lines: the figures and the HTML page share the figure names
(`FIGURES`), the layer order and the number formats, and `write_report` embeds every figure;
about half the lines are plotting boilerplate that reads straight down. Split it (figures /
html) if a new kind of figure is added.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from io import BytesIO
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from smpq.fileio import atomic_write_bytes, atomic_write_text
from smpq.policy import Policy

__all__ = [
    "FIGURES", "alpha_shapley_agreement", "markdown_table", "plot_alpha_vs_shapley", "plot_bits",
    "plot_contributions", "plot_history", "plot_tradeoff", "write_report",
]

FLOAT_BITS = 32
Z95 = 1.959963984540054
KINDS = {"w": "weights", "a": "activations"}
# File name of each figure inside the output folder (the HTML links them relatively).
FIGURES = {k: f"{k}.png" for k in ("bits", "tradeoff", "contributions", "alpha_vs_shapley",
                                    "history")}
_METRIC_LABELS = {"bitops": "BitOPs", "size_bits": "model size (bits)", "avg_bits": "average bits"}
_PHASE_COLOURS = {"warmup": "#fdd9b5", "search": "#cfe3f5"}
PathLike = str | os.PathLike


# -- small helpers -------------------------------------------------------------------------------
def _num(value: Any) -> float:
    """JSON null (or garbage) as nan, so plots and tables never crash on a missing number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _txt(value: Any) -> str:
    """Matplotlib text with '$' escaped: a layer name must never be parsed as mathtext."""
    return str(value).replace("$", r"\$")


def _fmt(value: Any, floatfmt: str = ".4g") -> str:
    """One table cell: bools as yes/no, None as empty, floats with `floatfmt`."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else format(float(value), floatfmt)
    return str(value)


def _as_policy(policy: Policy | Mapping) -> Policy:
    return policy if isinstance(policy, Policy) else Policy.from_dict(dict(policy))


def _layer_order(contributions: Mapping) -> list[str]:
    """Model order: the `layers` mapping first, then any layer only named by players/history."""
    names = list(contributions.get("layers") or {})
    names += [p["layer"] for p in contributions.get("players") or []]
    for h in contributions.get("history") or []:
        names += list(h.get("alpha") or {})
    return list(dict.fromkeys(names))


def _figure(width: float, height: float, nrows: int = 1, sharex: bool = False):
    """A pyplot-free Agg figure: no global state to leak between reports."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0])


def _width(n: int) -> float:
    """Figure width that keeps one rotated label per layer readable."""
    return min(max(6.5, 0.45 * n + 3.0), 40.0)


def _layer_axis(ax, names: Sequence[str]) -> None:
    size = 8 if len(names) > 16 else 9
    labels = [_txt(n) for n in names]
    ax.set_xticks(range(len(names)), labels, rotation=45, ha="right", rotation_mode="anchor",
                  fontsize=size)
    ax.set_xlim(-0.6, len(names) - 0.4)


def _fig_legend(fig, axes) -> None:
    """One legend outside the axes, deduplicated across panels, so it never hides data."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=8)


def _save(fig, path: PathLike) -> Path:
    """Render to memory, then rename into place: a reader never sees a half-written PNG."""
    path = Path(path)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


# -- figures -------------------------------------------------------------------------------------
def plot_bits(policy: Policy | Mapping, path: PathLike) -> Path:
    """Weight and activation bits per layer; float tensors are labelled, not drawn 32 high."""
    table = _as_policy(policy).bits_table()
    names = list(table)
    fig, (ax,) = _figure(_width(len(names)), 4.0)
    x = np.arange(len(names))
    quant = [b for pair in table.values() for b in pair if b < FLOAT_BITS]
    top = max(quant, default=8)
    for i, (label, colour) in enumerate((("weights", "C0"), ("activations", "C1"))):
        bits = np.array([table[n][i] for n in names], dtype=int)
        xs = x + (i - 0.5) * 0.4
        is_float = bits >= FLOAT_BITS
        ax.bar(xs, np.where(is_float, 0, bits), 0.4, color=colour, label=label)
        for xo, b, f in zip(xs, bits, is_float, strict=True):
            text, y = ("fp32", 0.15) if f else (str(b), b + 0.1)
            ax.text(xo, y, text, ha="center", va="bottom", fontsize=8, color=colour if f else "k",
                    rotation=90 if f else 0, fontweight="bold" if f else "normal")
    ax.set_ylim(0, max(top * 1.3, top + 2))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("bits")
    ax.set_title("Bit-width per layer")
    _layer_axis(ax, names)
    _fig_legend(fig, [ax])
    return _save(fig, path)


def _ci95(player: Mapping) -> tuple[float, float]:
    """Lower/upper error-bar lengths: the stored CI if any, else 1.96 standard errors."""
    est = _num(player.get("estimate"))
    low, high = _num(player.get("ci_low")), _num(player.get("ci_high"))
    if not (math.isnan(low) or math.isnan(high)):
        return max(est - low, 0.0), max(high - est, 0.0)
    se = _num(player.get("stderr"))
    return (0.0, 0.0) if math.isnan(se) else (Z95 * se, Z95 * se)


def plot_contributions(contributions: Mapping, path: PathLike) -> Path | None:
    """Shapley estimate (95% CI) of every candidate, per layer; None when there are no players."""
    players = list(contributions.get("players") or [])
    if not players:
        return None
    layers = _layer_order(contributions)
    pos = {n: i for i, n in enumerate(layers)}
    all_bits = sorted({int(p["bits"]) for p in players})
    colours = {b: f"C{i % 10}" for i, b in enumerate(all_bits)}
    fig, axes = _figure(_width(len(layers)), 6.0, nrows=2, sharex=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        mine = [p for p in players if p["kind"] == kind]
        bits = sorted({int(p["bits"]) for p in mine})
        step = 0.8 / max(len(bits), 1)
        for j, b in enumerate(bits):
            sel = [p for p in mine if int(p["bits"]) == b]
            xs = [pos[p["layer"]] + (j - (len(bits) - 1) / 2) * step for p in sel]
            errs = np.array([_ci95(p) for p in sel]).T
            ax.errorbar(xs, [_num(p["estimate"]) for p in sel], yerr=errs, fmt="o", ms=4,
                        capsize=2, color=colours[b], label=f"{b}-bit")
        if not mine:
            ax.text(0.5, 0.5, "no candidates", transform=ax.transAxes, ha="center", color="grey")
        ax.axhline(0.0, color="grey", lw=0.8)
        for edge in np.arange(1, len(layers)) - 0.5:  # separate the layer groups
            ax.axvline(edge, color="#e4e4e4", lw=0.8, zorder=0)
        ax.set_ylabel(f"Shapley ({_txt(contributions.get('value', 'v'))})")
        ax.set_title(f"{KINDS[kind]}: contribution of each bit-width candidate (95% CI)",
                     fontsize=10)
    _layer_axis(axes[-1], layers)
    _fig_legend(fig, axes)
    return _save(fig, path)


def _pairs(contributions: Mapping) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """(layer, kind, bits, alpha, shapley) over the candidates having both alpha and estimate."""
    est = {(p["layer"], p["kind"], int(p["bits"])): _num(p["estimate"])
           for p in contributions.get("players") or []}
    out = []
    for layer, info in (contributions.get("layers") or {}).items():
        for kind in KINDS:
            bits, alpha = info.get(f"{kind}_bits") or [], info.get(f"alpha_{kind}") or []
            if len(bits) != len(alpha):
                continue  # malformed entry: better a shorter table than a wrong one
            keep = [(int(b), _num(a), est[layer, kind, int(b)])
                    for b, a in zip(bits, alpha, strict=True) if (layer, kind, int(b)) in est]
            if keep:
                b, a, s = (np.array(v) for v in zip(*keep, strict=True))
                out.append((layer, kind, b, a, s))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho requires."""
    return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x], dtype=float)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; nan when undefined (fewer than 2 points, a constant or non-finite input)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def alpha_shapley_agreement(contributions: Mapping) -> list[dict]:
    """Per (layer, kind): the bit-width alpha prefers vs the one Shapley prefers, and their rho.

    Only candidates with both an alpha and a Shapley estimate are compared; ties in an argmax go
    to the first candidate in the stored order.
    """
    return [
        {"layer": layer, "kind": kind, "alpha_choice_bits": int(bits[np.argmax(alpha)]),
         "shapley_choice_bits": int(bits[np.argmax(shap)]), "spearman": _spearman(alpha, shap)}
        for layer, kind, bits, alpha, shap in _pairs(contributions)
    ]


def plot_alpha_vs_shapley(contributions: Mapping, path: PathLike) -> Path | None:
    """Where DMPQ's alpha and SMPQ's Shapley values pick different bit-widths; None if no pairs."""
    pairs = _pairs(contributions)
    if not pairs:
        return None
    rows = alpha_shapley_agreement(contributions)
    levels = sorted({int(b) for _, _, bits, _, _ in pairs for b in bits})
    grid = np.full((len(levels), len(pairs)), np.nan)
    for j, (_, _, bits, _, shap) in enumerate(pairs):
        span = np.ptp(shap)
        scaled = (shap - shap.min()) / span if span > 0 else np.full(len(shap), 0.5)
        for b, s in zip(bits, scaled, strict=True):
            grid[levels.index(int(b)), j] = s
    fig, (top, bottom) = _figure(_width(len(pairs)), 6.5, nrows=2, sharex=True)
    image = top.imshow(np.ma.masked_invalid(grid), cmap="Blues", vmin=0, vmax=1, aspect="auto",
                       origin="lower", interpolation="nearest")
    x = np.arange(len(rows))
    top.scatter(x, [levels.index(r["alpha_choice_bits"]) for r in rows], s=220, marker="o",
                facecolors="none", edgecolors="C3", linewidths=2, label="alpha argmax")
    top.scatter(x, [levels.index(r["shapley_choice_bits"]) for r in rows], s=70, marker="x",
                color="k", linewidths=2, label="Shapley argmax")
    top.set_yticks(range(len(levels)), [f"{b}-bit" for b in levels])
    top.set_title("Preferred bit-width: alpha vs Shapley (red labels: they disagree)",
                  fontsize=10)
    fig.colorbar(image, ax=[top, bottom], shrink=0.6, label="Shapley, min-max scaled per column")
    rho = np.array([r["spearman"] for r in rows], dtype=float)
    bottom.bar(x, np.nan_to_num(rho), color=["C2" if v >= 0 else "C3" for v in np.nan_to_num(rho)])
    for xi, v in zip(x, rho, strict=True):
        undefined = math.isnan(v)
        bottom.text(xi, 0.03 if undefined else max(v, 0.0) + 0.03,
                    "n/a" if undefined else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    bottom.axhline(0.0, color="grey", lw=0.8)
    bottom.set_ylim(-1.1, 1.25)
    bottom.set_ylabel("Spearman rho\n(alpha vs Shapley)")
    _layer_axis(bottom, [f"{r['layer']} ({r['kind'].upper()})" for r in rows])
    for tick, r in zip(bottom.get_xticklabels(), rows, strict=True):
        if r["alpha_choice_bits"] != r["shapley_choice_bits"]:
            tick.set_color("C3")
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.08), ncols=2, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_tradeoff(comparison: Sequence[Mapping], path: PathLike, metric: str = "bitops"
                  ) -> Path | None:
    """Test accuracy vs cost per method; uniform baselines joined as the reference frontier."""
    pts = [(str(r.get("method", "?")), _num(r.get(metric)), _num(r.get("test_acc")))
           for r in comparison]
    pts = sorted((p for p in pts if math.isfinite(p[1]) and math.isfinite(p[2])),
                 key=lambda p: p[1])
    if not pts:
        return None
    fig, (ax,) = _figure(7.0, 4.5)
    uniform = [p for p in pts if p[0].lower().startswith("uniform")]
    if len(uniform) > 1:
        ax.plot([p[1] for p in uniform], [p[2] for p in uniform], "-", color="grey", zorder=1)
    for i, (name, xv, yv) in enumerate(pts):
        is_uniform = name.lower().startswith("uniform")
        ax.scatter(xv, yv, s=40 if is_uniform else 130, marker="o" if is_uniform else "*",
                   color="grey" if is_uniform else f"C{i % 10}", zorder=2)
        ax.annotate(_txt(name), (xv, yv), xytext=(6, 6 if i % 2 == 0 else -12),
                    textcoords="offset points", fontsize=8)
    xs = [p[1] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel(_METRIC_LABELS.get(metric, _txt(metric)))
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs cost")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _phase_runs(phases: Sequence[str]) -> list[tuple[str, int, int]]:
    """Contiguous (phase, first index, last index) runs."""
    runs, start = [], 0
    for ph, group in groupby(phases):
        n = len(list(group))
        runs.append((ph, start, start + n - 1))
        start += n
    return runs


def plot_history(contributions: Mapping, path: PathLike) -> Path | None:
    """Validation accuracy and training loss per epoch, warmup/search phases shaded."""
    hist = list(contributions.get("history") or [])
    if not hist:
        return None
    epochs = np.array([_num(h.get("epoch")) for h in hist])
    fig, axes = _figure(7.5, 5.0, nrows=2, sharex=True)
    series = (("val_acc", "val accuracy", "C0"), ("train_loss", "train loss", "C1"))
    for ax, (key, label, colour) in zip(axes, series, strict=True):
        ax.plot(epochs, [_num(h.get(key)) for h in hist], "o-", ms=3, color=colour, label=label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for ph, a, b in _phase_runs([str(h.get("phase", "")) for h in hist]):
            left = (epochs[a] + epochs[a - 1]) / 2 if a > 0 else epochs[a] - 0.5
            right = (epochs[b] + epochs[b + 1]) / 2 if b + 1 < len(hist) else epochs[b] + 0.5
            ax.axvspan(left, right, color=_PHASE_COLOURS.get(ph, "#e6e6e6"), zorder=0,
                       label=f"{ph} phase")
    axes[0].set_title("Search history")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    _fig_legend(fig, axes)
    return _save(fig, path)


# -- tables and the page -------------------------------------------------------------------------
def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], floatfmt: str = ".4g") -> str:
    """A pipe table; numeric columns right-aligned so benchmark numbers line up."""

    def cell(v: Any) -> str:
        return _fmt(v, floatfmt).replace("|", r"\|").replace("\n", " ")

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    head = [cell(c) for c in columns]
    widths = [max(3, len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    values = [[r.get(c) for r in rows if r.get(c) is not None] for c in columns]
    numeric = [bool(v) and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
                               for x in v) for v in values]

    def line(cells: Iterable[str]) -> str:
        padded = (c.rjust(w) if n else c.ljust(w)
                  for c, w, n in zip(cells, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if n else "-" * (w + 2)
                          for w, n in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(head), rule, *(line(b) for b in body)])


def _html_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]],
                row_class=None) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for r in rows:
        cls = row_class(r) if row_class else ""
        cells = "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in columns)
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _budget_section(budget: Sequence[Mapping]) -> str:
    binding = [str(r.get("constraint")) for r in budget if r.get("binding")]
    failed = [str(r.get("constraint")) for r in budget if not r.get("ok", True)]
    lines = [_p("Binding: " + ", ".join(binding) if binding else "No constraint binds.")]
    if failed:
        lines.append(f'<p class="warn">{html.escape("Violated: " + ", ".join(failed))}</p>')
    cols = [(k, k) for k in ("constraint", "metric", "limit", "value", "slack", "ok", "binding")]
    table = _html_table(budget, cols, lambda r: "fail" if not r.get("ok", True)
                        else "binding" if r.get("binding") else "")
    return _section("Budget", *lines, table)


def _agreement_section(rows: list[dict]) -> str:
    same = sum(r["alpha_choice_bits"] == r["shapley_choice_bits"] for r in rows)
    rho = [r["spearman"] for r in rows if not math.isnan(r["spearman"])]
    mean = f"{sum(rho) / len(rho):.3f}" if rho else "n/a"
    summary = (f"alpha and Shapley prefer the same bit-width for {same} of {len(rows)} "
               f"(layer, kind) pairs; mean Spearman rho {mean}.")
    shown = [dict(r, kind=KINDS.get(r["kind"], r["kind"]),
                  agree=r["alpha_choice_bits"] == r["shapley_choice_bits"]) for r in rows]
    cols = [("layer", "layer"), ("kind", "kind"), ("alpha_choice_bits", "alpha choice (bits)"),
            ("shapley_choice_bits", "Shapley choice (bits)"), ("agree", "agree"),
            ("spearman", "Spearman rho")]
    table = _html_table(shown, cols, lambda r: "" if r["agree"] else "disagree")
    return _section("alpha vs Shapley", _p(summary), table)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
tr.binding{background:#fff4cc}tr.fail,tr.disagree{background:#fde2e2}.warn{color:#b00020}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555}"""


def write_report(
    out_dir: PathLike,
    *,
    title: str,
    policy: Policy | Mapping,
    contributions: Mapping | None,
    comparison: Sequence[Mapping],
    budget: Sequence[Mapping] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write the figures and ``report.html`` (relative image links) into `out_dir`.

    An engine search (contributions with a `value_curve`) also gets the value-vs-evaluations
    curve and the interaction heatmap (`smpq.report_engine`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy, contributions = _as_policy(policy), contributions or {}
    figures = [
        ("Bit-width per layer", plot_bits(policy, out / FIGURES["bits"])),
        ("Accuracy vs cost", plot_tradeoff(comparison, out / FIGURES["tradeoff"])),
        ("Shapley contributions", plot_contributions(contributions,
                                                     out / FIGURES["contributions"])),
        ("alpha vs Shapley", plot_alpha_vs_shapley(contributions,
                                                   out / FIGURES["alpha_vs_shapley"])),
        ("Search history", plot_history(contributions, out / FIGURES["history"])),
    ]
    if contributions.get("value_curve"):
        from smpq.report_engine import ENGINE_FIGURES, plot_interactions, plot_value_curve

        figures += [("Best value vs evaluations", plot_value_curve(
                        contributions, out / ENGINE_FIGURES["value_curve"])),
                    ("Pairwise interactions", plot_interactions(
                        contributions, out / ENGINE_FIGURES["interactions"]))]
    imgs = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(cap)}">'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, p in figures if p is not None)
    summary = (f"method: {contributions.get('method', 'n/a')}; value: "
               f"{contributions.get('value', 'n/a')}; candidates (players): "
               f"{len(contributions.get('players') or [])}; "
               + (f"evaluations: {len(contributions['value_curve'])}; surrogate K-fold R^2: "
                  f"{_fmt(contributions.get('r2_cv'))}" if contributions.get("value_curve")
                  else f"epochs: {len(contributions.get('history') or [])}"))
    bits = policy.bits_table()
    policy_rows = [
        {"layer": n, "w": "fp32" if w >= FLOAT_BITS else w, "a": "fp32" if a >= FLOAT_BITS else a,
         "format": c.label if (c := policy.layers[n]) is not None else "fp32"}
        for n, (w, a) in bits.items()
    ]
    comp_cols = [(k, k) for k in ("method", "val_acc", "test_acc", "bitops", "size_bits",
                                  "avg_bits")]
    sections = [
        _p(summary),
        _section("Comparison", _html_table(comparison, comp_cols)),
        _budget_section(budget) if budget else "",
        _section("Figures", imgs),
        _section("Policy", _html_table(policy_rows, [("layer", "layer"), ("w", "W bits"),
                                                     ("a", "A bits"), ("format", "format")])),
    ]
    agreement = alpha_shapley_agreement(contributions)
    if agreement:
        sections.append(_agreement_section(agreement))
    if notes:
        items = "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
        sections.append(_section("Notes", f"<ul>{items}</ul>"))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(s for s in sections if s)
            + "\n</body></html>\n")
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
