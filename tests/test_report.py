"""The report is built from plain dicts: figures render, HTML links them and escapes names."""

import math
import subprocess
import sys

import numpy as np
import pytest

from smpq.policy import Policy
from smpq.report import (
    FIGURES,
    alpha_shapley_agreement,
    markdown_table,
    plot_alpha_vs_shapley,
    plot_contributions,
    plot_history,
    plot_tradeoff,
    write_report,
)
from smpq.spec import LayerChoice

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "blocks.<script>alert(1)</script>"
BITS = [2, 3, 4, 8]


def _policy() -> Policy:
    return Policy({
        "stem": LayerChoice.bits(8, 8),
        "blocks.0.conv1": LayerChoice.bits(3, 4),
        EVIL: LayerChoice.bits(2, 8),
        "fc": None,
    }, meta={"method": "smpq"})


def _contributions(method: str = "smpq") -> dict:
    rng = np.random.default_rng(0)
    layers, players = {}, []
    for name in ("stem", "blocks.0.conv1", EVIL):
        layers[name] = {"w_bits": BITS, "a_bits": BITS,
                        "alpha_w": rng.normal(size=4).tolist(),
                        "alpha_a": rng.normal(size=4).tolist()}
        if method != "smpq":
            continue
        for kind in ("w", "a"):
            for b in BITS:
                est, se = float(rng.normal(0.02 * b, 0.01)), 0.004
                players.append({"layer": name, "kind": kind, "bits": b, "label": f"{kind}{b}",
                                "estimate": est, "stderr": se, "ci_low": est - 1.96 * se,
                                "ci_high": est + 1.96 * se, "n_samples": 32})
    if players:
        players[-1].update(stderr=None, ci_low=None, ci_high=None)  # a point without a CI
    history = [{"epoch": e, "phase": "warmup" if e < 2 else "search",
                "train_loss": 2.0 / (e + 1), "val_acc": 0.5 + 0.05 * e, "evaluations": 10 * e,
                "seconds": 1.5, "alpha": {n: {k: v for k, v in d.items() if k.startswith("alpha")}
                                          for n, d in layers.items()}} for e in range(6)]
    return {"method": method, "value": "acc", "players": players, "layers": layers,
            "history": history}


COMPARISON = [
    {"method": m, "val_acc": acc + 0.01, "test_acc": acc, "bitops": ops, "size_bits": size,
     "avg_bits": avg}
    for m, acc, ops, size, avg in [
        ("smpq", 0.905, 1.1e7, 9.0e5, 3.1), ("dmpq", 0.897, 1.2e7, 9.5e5, 3.2),
        ("uniform 2/2", 0.82, 4.0e6, 6.0e5, 2.0), ("uniform 3/3", 0.88, 9.0e6, 8.0e5, 3.0),
        ("uniform 4/4", 0.91, 1.6e7, 1.0e6, 4.0), ("float", 0.92, 1.0e9, 8.0e6, 32.0)]
]
BUDGET = [
    {"constraint": "bitops<=uniform:3/3", "metric": "bitops", "limit": 1.2e7, "value": 1.1e7,
     "slack": 1.0e6, "ok": True, "binding": True},
    {"constraint": "size<=1MB", "metric": "size", "limit": 8.0e6, "value": 7.2e6,
     "slack": 8.0e5, "ok": True, "binding": False},
]


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


def test_full_report(tmp_path):
    notes = ["seed 0", "a <b>note</b> & more"]
    out = write_report(tmp_path / "run", title="SMPQ <resnet>", policy=_policy(),
                       contributions=_contributions(), comparison=COMPARISON, budget=BUDGET,
                       notes=notes)
    assert out == tmp_path / "run" / "report.html"
    page = out.read_text()
    for name in FIGURES.values():
        _assert_png(tmp_path / "run" / name)
        assert f'src="{name}"' in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "SMPQ &lt;resnet&gt;" in page and "a &lt;b&gt;note&lt;/b&gt; &amp; more" in page
    assert "Binding: bitops&lt;=uniform:3/3" in page
    assert page.count("fp32") >= 2  # the float layer's W and A cells
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes left nothing behind


def test_dmpq_report_has_no_contribution_figures(tmp_path):
    contributions = _contributions("dmpq")
    assert plot_contributions(contributions, tmp_path / "c.png") is None
    assert plot_alpha_vs_shapley(contributions, tmp_path / "a.png") is None
    assert alpha_shapley_agreement(contributions) == []
    page = write_report(tmp_path, title="DMPQ", policy=_policy().to_dict(),
                        contributions=contributions, comparison=COMPARISON).read_text()
    for key in ("contributions", "alpha_vs_shapley"):
        assert not (tmp_path / FIGURES[key]).exists()
        assert FIGURES[key] not in page
    for key in ("bits", "tradeoff", "history"):
        _assert_png(tmp_path / FIGURES[key])
        assert FIGURES[key] in page
    assert "Budget" not in page and "alpha vs Shapley</h2>" not in page


def _hand_case(alpha_w, alpha_a, shap_w, shap_a, bits=(2, 4, 8)) -> dict:
    players = [{"layer": "L", "kind": k, "bits": b, "label": f"{k}{b}", "estimate": s,
                "stderr": None, "ci_low": None, "ci_high": None, "n_samples": 1}
               for k, est in (("w", shap_w), ("a", shap_a)) for b, s in zip(bits, est, strict=True)]
    return {"method": "smpq", "value": "acc", "players": players, "history": [],
            "layers": {"L": {"w_bits": list(bits), "a_bits": list(bits), "alpha_w": alpha_w,
                             "alpha_a": alpha_a}}}


def test_agreement_identical_and_reversed_orderings():
    rows = alpha_shapley_agreement(_hand_case([0.1, 0.5, 0.9], [0.9, 0.5, 0.1],
                                              [0.01, 0.02, 0.03], [0.01, 0.02, 0.03]))
    assert [(r["layer"], r["kind"]) for r in rows] == [("L", "w"), ("L", "a")]
    w, a = rows
    assert (w["alpha_choice_bits"], w["shapley_choice_bits"]) == (8, 8)
    assert w["spearman"] == pytest.approx(1.0)
    assert (a["alpha_choice_bits"], a["shapley_choice_bits"]) == (2, 8)
    assert a["spearman"] == pytest.approx(-1.0)


def test_agreement_constant_and_ties():
    rows = alpha_shapley_agreement(_hand_case([0.3, 0.3, 0.3], [1.0, 1.0, 2.0],
                                              [0.01, 0.02, 0.03], [0.01, 0.02, 0.03]))
    assert math.isnan(rows[0]["spearman"])  # constant alpha: rank correlation undefined
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = scipy_stats.spearmanr([1.0, 1.0, 2.0], [0.01, 0.02, 0.03]).statistic
    assert rows[1]["spearman"] == pytest.approx(expected)


def test_agreement_only_compares_candidates_with_both_values():
    case = _hand_case([0.1, 0.2, 5.0], [0.1, 0.2, 0.3], [0.03, 0.02], [0.01, 0.02], bits=(2, 4))
    case["layers"]["L"].update(w_bits=[2, 4, 8], a_bits=[2, 4, 8])  # 8-bit has no estimate
    w, _ = alpha_shapley_agreement(case)
    assert (w["alpha_choice_bits"], w["shapley_choice_bits"]) == (4, 2)
    assert w["spearman"] == pytest.approx(-1.0)


def test_empty_inputs_skip_figures(tmp_path):
    empty = {"method": "smpq", "value": "acc", "players": [], "layers": {}, "history": []}
    assert plot_history(empty, tmp_path / "h.png") is None
    assert plot_tradeoff([], tmp_path / "t.png") is None
    assert not list(tmp_path.iterdir())


def test_markdown_table():
    rows = [{"method": "a|b", "acc": 0.912345, "n": 3, "ok": True},
            {"method": "c", "acc": None, "n": 12, "ok": False}]
    lines = markdown_table(rows, ["method", "acc", "n", "ok"]).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| method") and lines[0].endswith("|")
    assert set(lines[1]) <= set("|-:") and lines[1].count(":") == 2  # acc and n right-aligned
    assert r"a\|b" in lines[2] and "0.9123" in lines[2] and "yes" in lines[2]
    assert len({len(line) for line in lines}) == 1  # columns padded to a common width


def test_report_module_imports_matplotlib_lazily():
    code = ("import sys, smpq; assert 'matplotlib' not in sys.modules, 'import smpq'; "
            "import smpq.report; assert 'matplotlib' not in sys.modules, 'import smpq.report'")
    subprocess.run([sys.executable, "-c", code], check=True)
