"""Honest per-method timings: a shared calibration-statistics pass is billed in full to every
method that reads it, whatever ran first; RTN never collects statistics."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("transformers")

import smpq.backends  # noqa: E402
from conftest import save_tiny_llama  # noqa: E402
from smpq import strategy  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.strategy import SearchProblem  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"
PAUSE = 0.4  # added to the statistics pass: a lower bound every user must report


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def slow_stats(monkeypatch):
    real, calls = smpq.backends.collect_input_stats, []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(PAUSE)
        return real(*args, **kwargs)

    monkeypatch.setattr(smpq.backends, "collect_input_stats", slow)
    return calls


def _session(model_dir, tmp_path, backend="rtn") -> PTQSession:
    settings = RunSettings(block=32, calib_blocks=2, val_blocks=2, test_blocks=2,
                           cache_dir=str(tmp_path / "cache"))
    return PTQSession(str(model_dir), backend, CANDS, settings).prepare()


@pytest.mark.parametrize("order", [("hessian", "relerr"), ("relerr", "hessian")])
def test_stats_billed_to_each_reader_in_any_order(model_dir, tmp_path, slow_stats, order):
    s = _session(model_dir, tmp_path)
    costs = {m: s.baseline(m)[2] for m in order}
    assert len(slow_stats) == 1  # one pass, shared
    for m in order:
        assert costs[m]["stats"] == "shared"
        assert costs[m]["stats_seconds"] >= PAUSE
        assert costs[m]["seconds"] >= PAUSE  # the second reader too


def test_shapley_loop_bills_a_cached_prior_pass(model_dir, tmp_path, slow_stats):
    s = _session(model_dir, tmp_path)
    s.baseline("hessian")  # the statistics are cached now
    budget = Budget.parse("avg_bits=4")
    res = strategy.get("shapley-loop", "transformer")(SearchProblem(
        s, s.cost, budget, s.specs, options={"priors": ("hessian",), "n_evaluations": 12}))
    assert len(slow_stats) == 1
    assert res.detail.cost["prior_seconds"] >= PAUSE
    assert res.detail.cost["seconds"] >= PAUSE  # wall time alone would miss the cached pass


def test_gptq_candidates_report_the_pass_and_so_does_hessian(model_dir, tmp_path, slow_stats):
    s = _session(model_dir, tmp_path, "gptq")
    c = s.candidate_cost
    assert c["built"] == len(s.linears) * 3 and c["stats"] == "shared"
    assert c["stats_seconds"] >= PAUSE and c["seconds"] >= c["stats_seconds"]
    assert c["quantize_seconds"] < c["seconds"]
    assert s.baseline("hessian")[2]["seconds"] >= PAUSE  # cached by the build, still billed
    again = _session(model_dir, tmp_path, "gptq")  # every candidate from the shared cache
    assert again.candidate_cost["built"] == 0 and "stats" not in again.candidate_cost
    assert len(slow_stats) == 1  # loading candidates needs no statistics


def test_rtn_never_collects_statistics(model_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("RTN collected calibration statistics")

    monkeypatch.setattr(smpq.backends, "collect_input_stats", boom)
    s = _session(model_dir, tmp_path)
    assert s.candidate_cost["built"] == len(s.linears) * 3 and "stats" not in s.candidate_cost
    for method in ("uniform", "fisher", "gradxdw"):
        cost = s.baseline(method)[2]
        assert "stats" not in cost and "stats_seconds" not in cost
    res = strategy.get("shapley-loop", "transformer")(SearchProblem(
        s, s.cost, Budget.parse("avg_bits=4"), s.specs, options={"n_evaluations": 12}))
    assert res.detail.cost["seconds"] > 0
    assert s.stats_seconds == 0.0
