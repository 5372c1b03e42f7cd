"""The `evopress` transformer strategy and `SessionValue`'s fidelity (n_blocks) on a tiny Llama.

References: feasibility by `Budget.check` on the policy; values recomputed by swapping
weights and calling `kl_to_float` directly, on a float reference built afresh on the first
blocks; block-tokens counted by hand (blocks x block length x layers).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq import strategy  # noqa: E402
from smpq.cli import main  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.strategy import SearchProblem  # noqa: E402
from smpq.transformer.engine_strategy import (  # noqa: E402
    SessionValue,
    ladder_order,
    unit_ladders,
)
from smpq.transformer.mixed import MixedConfig  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings  # noqa: E402
from smpq.transformer.values import float_reference, kl_to_float  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"
BLOCK, N_BLOCKS, LAYERS = 32, 4, 2
SMALL = RunSettings(block=BLOCK, calib_blocks=N_BLOCKS, val_blocks=4, test_blocks=4,
                    shapley=MixedConfig(permutations=4, tolerance=None))
BUDGET = Budget.parse("avg_bits=3.5")
FULL = N_BLOCKS * BLOCK * LAYERS  # block-tokens of one full evaluation


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=LAYERS, max_positions=64)
    yield PTQSession(str(folder), "rtn", CANDS, SMALL).prepare()
    torch.set_num_threads(before)


def _kl(session, choice, ref) -> float:
    keys = session.candidates.keys
    with session.swapper.applied({n: keys[k] for g, k in zip(session.groups, choice, strict=True)
                                  for n in g}):
        return kl_to_float(session.model, ref)


def _search(session, seed=0, **options):
    return strategy.get("evopress", "transformer")(SearchProblem(
        session, session.cost, BUDGET, session.specs, seed=seed, options=options))


def test_session_value_on_the_first_blocks_matches_a_fresh_reference(session):
    costs, _, _ = session.budget_costs(BUDGET, session.resolve(BUDGET))
    ladders = unit_ladders(session, ladder_order(costs))
    value = SessionValue(session, ladders)
    levels = np.array([[k % len(lad) for k, lad in enumerate(ladders)]])
    choice = [int(lad[k]) for lad, k in zip(ladders, levels[0], strict=True)]
    session.swapper.restore()
    fresh = float_reference(session.model, session.refs["calib"].blocks[:2], batch_size=8)
    got = value(levels, n_blocks=2)[0]
    assert got == pytest.approx(-math.log(_kl(session, choice, fresh) + 1e-9), rel=1e-5)
    full = value(levels)[0]
    assert full == pytest.approx(-math.log(_kl(session, choice, session.refs["calib"]) + 1e-9),
                                 rel=1e-5)
    assert value.block_tokens == 2 * BLOCK * LAYERS + FULL
    assert value.full_block_tokens(2) == 2 * BLOCK * LAYERS and value.full_block_tokens() == FULL
    with pytest.raises(SmpqError, match="n_blocks"):  # more blocks than there are
        value.full_block_tokens(99)


def test_evopress_returns_a_fitting_policy_whose_value_is_recomputed(session):
    res = _search(session, n_evaluations=10, offspring=6, stages=[(1, 3), (2, 2), (None, 1)])
    cost, evo = res.detail.cost, res.info["evopress"]
    assert all(r["ok"] for r in BUDGET.check(session.cost, res.policy))
    mine = -math.log(_kl(session, res.detail.choice, session.refs["calib"]) + 1e-9)
    assert evo["value"] == pytest.approx(mine, rel=1e-6, abs=1e-9)
    assert max(res.info["value_curve"]) == pytest.approx(mine, rel=1e-6, abs=1e-9)
    by_hand = sum(c * (FULL if f == "full" else int(f) * BLOCK * LAYERS)
                  for f, c in cost["counts"].items())
    # prefix reuse (on by default) saves part of each evaluation's full price
    assert cost["block_tokens"] + cost["block_tokens_saved"] == by_hand
    assert cost["block_tokens"] <= 10 * FULL
    assert cost["evaluations"] == sum(cost["counts"].values()) == cost["forward_passes"]
    assert set(cost["counts"]) <= {"1", "2", "full"} and cost["counts"]["1"] >= 1
    spent = [s for s, _ in evo["curve"]]
    assert spent == sorted(spent) and spent[-1] <= cost["block_tokens"]


@pytest.mark.parametrize("options, msg", [
    ({"offspring": 0}, "offspring"), ({"offspring": "many"}, "bad evopress option"),
    ({"stages": [(2, 4)]}, "last stage"), ({"stages": "x"}, "bad evopress option"),
    ({"block_tokens": 1}, "below one full evaluation"), ({"n_evaluations": 0}, "evaluation"),
    ({"stages": [(2, 4), (1, 2), (None, 1)]}, "rise"),
])
def test_bad_options_are_one_line_errors(session, options, msg):
    with pytest.raises(SmpqError, match=msg) as err:
        _search(session, **options)
    assert "\n" not in str(err.value)


def test_smpq_ptq_method_evopress(monkeypatch, capsys, tmp_path):
    folder = save_tiny_llama(tmp_path / "llama", layers=1, max_positions=256)
    text = tmp_path / "calib.jsonl"
    docs = [{"text": f"document {i}: " + "the quick brown fox jumps. " * 12} for i in range(8)]
    text.write_text("\n".join(json.dumps(d) for d in docs))
    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", [
        "smpq", "ptq", "--model", str(folder), "--method", "evopress", "--calib-text", str(text),
        "--calib-tokens", "256", "--evaluations", "5", "--candidates", CANDS,
        "--budget", "avg_bits=3.5", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code in (0, None), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "evopress"
    assert all(r["ok"] for r in summary["budget_check"])
    assert 0 < summary["search_cost"]["block_tokens"]
