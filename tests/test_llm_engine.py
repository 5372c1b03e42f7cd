"""shapley-loop for transformers (smpq.transformer.engine_strategy) on a tiny random Llama.

References are independent of the engine: budgets checked by `Budget.check` on the policy,
values recomputed by swapping weights and calling `kl_to_float` directly, the best policy
recomputed from the saved list of every evaluated policy.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq import strategy  # noqa: E402
from smpq.cost import Budget  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.strategy import SearchProblem  # noqa: E402
from smpq.transformer.mixed import MixedConfig, choice_policy  # noqa: E402
from smpq.transformer.run import PTQSession, RunSettings, run_ptq  # noqa: E402
from smpq.transformer.values import kl_to_float  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"
SMALL = RunSettings(block=32, calib_blocks=4, val_blocks=4, test_blocks=4,
                    shapley=MixedConfig(permutations=4, tolerance=None))
BUDGET = Budget.parse("avg_bits=3.5")
EVALS = 14


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    folder = save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=2, max_positions=64)
    return PTQSession(str(folder), "rtn", CANDS, SMALL).prepare()


def _run(session, seed=0, **options):
    problem = SearchProblem(session, session.cost, BUDGET, session.specs, seed=seed,
                            options={"n_evaluations": EVALS, "top_k": 3} | options)
    return strategy.get("shapley-loop", "transformer")(problem)


def _neg_kl(session, choice) -> float:
    keys = session.candidates.keys
    with session.swapper.applied({n: keys[k] for g, k in zip(session.groups, choice, strict=True)
                                  for n in g}):
        return -kl_to_float(session.model, session.refs["calib"])


@pytest.fixture(scope="module")
def found(session, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    return _run(session, out=out), out


def test_is_the_default_transformer_method():
    assert strategy.names("transformer")[0] == "shapley-loop"


def test_result_is_feasible_and_consistent(session, found):
    res, _ = found
    choice = res.detail.choice
    assert all(row["ok"] for row in BUDGET.check(session.cost, res.policy))
    assert res.policy.layers == choice_policy(session.groups, session.specs, choice).layers
    assert res.evaluations >= EVALS - 1  # forward passes: engine evaluations (+0 for priors)
    assert res.detail.cost["evaluations"] <= EVALS
    assert len(res.detail.scores) == len(session.groups)
    for sc in res.detail.scores:  # 0 at the cheapest candidate, as choice_scores
        assert sc.shape == (len(session.specs),) and sc[0] == 0.0


def test_returns_the_best_evaluated_feasible_policy(session, found):
    """Recompute every evaluated policy's feasibility with Budget.check and its value from
    the saved list: the result is the best feasible one, and its value is -log KL."""
    from smpq.transformer.engine_strategy import policy_space

    res, out = found
    st = json.loads((out / "engine_state.json").read_text())
    _, order = policy_space(session, BUDGET, session.resolve(BUDGET))
    best, best_v = None, -math.inf
    for levels, v in zip(st["choices"], st["values"], strict=True):
        choice = tuple(int(order[k]) for k in levels)
        pol = choice_policy(session.groups, session.specs, choice)
        if all(r["ok"] for r in BUDGET.check(session.cost, pol)) and v > best_v:
            best, best_v = choice, v
    assert res.detail.choice == best
    kl = -_neg_kl(session, best)
    assert res.info["engine"]["best_value"] == pytest.approx(-math.log(kl + 1e-9), rel=1e-9)


@pytest.mark.parametrize("prior", ["fisher", "uniform"])
def test_never_worse_than_the_priors(session, found, prior):
    res, _ = found
    other = strategy.get(prior, "transformer")(
        SearchProblem(session, session.cost, BUDGET, session.specs)).detail.choice
    assert _neg_kl(session, res.detail.choice) >= _neg_kl(session, other) - 1e-12
    assert res.info["engine"]["priors"][prior]["value"] is not None


def test_deterministic_under_a_seed(session, found):
    res, _ = found
    again = _run(session)
    assert again.detail.choice == res.detail.choice
    assert again.info["engine"]["value_curve"] == res.info["engine"]["value_curve"]


class _Kill(Exception):
    pass


@pytest.mark.parametrize("kill_at", [3, EVALS - 2])  # during screening / inside the loop
def test_resume_after_a_kill_gives_the_same_choice(session, found, tmp_path, kill_at):
    res, _ = found

    def stop(done, planned, best):
        if done >= kill_at:
            raise _Kill

    import smpq.transformer.engine_strategy as es

    with pytest.raises(_Kill):
        _run(session, out=tmp_path, progress=stop)

    def no_priors(*args):
        raise AssertionError("a resume reads the priors back instead of scoring them again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(es, "_priors", no_priors)
        resumed = _run(session, out=tmp_path, resume=True)
    assert resumed.detail.choice == res.detail.choice
    assert resumed.info["engine"]["value_curve"] == res.info["engine"]["value_curve"]


def test_resume_on_other_data_is_refused(session, tmp_path, monkeypatch):
    def stop(done, planned, best):
        if done >= EVALS - 2:  # after the screening checkpoint
            raise _Kill

    with pytest.raises(_Kill):
        _run(session, out=tmp_path, progress=stop)
    real = session.fingerprint()
    monkeypatch.setattr(session, "fingerprint", lambda: {**real, "calibration": "other"})
    with pytest.raises(SmpqError, match="another model, calibration text"):
        _run(session, out=tmp_path, resume=True)


def test_space_totals_match_model_cost(session):
    """The space's full totals (unit costs + offsets) are ModelCost.metrics of the policy."""
    from smpq.transformer.engine_strategy import policy_space

    space, order = policy_space(session, BUDGET, session.resolve(BUDGET))
    rng = np.random.default_rng(0)
    levels = rng.integers(0, len(order), (20, space.n_units))
    tot = space.totals(levels)
    for i, lv in enumerate(levels):
        pol = choice_policy(session.groups, session.specs, [int(order[k]) for k in lv])
        metrics = session.cost.metrics(pol)
        ok = all(r["ok"] for r in BUDGET.check(session.cost, pol))
        assert bool(space.fits(lv[None])[0]) == ok
        for m in space.limits:
            assert tot[m][i] == pytest.approx(metrics[m], rel=1e-12)


def test_bad_options(session):
    with pytest.raises(SmpqError, match="evaluation budget"):
        _run(session, n_evaluations=3)
    with pytest.raises(SmpqError, match="top_k"):
        _run(session, top_k=0)
    with pytest.raises(SmpqError, match="infeasible"):
        problem = SearchProblem(session, session.cost, Budget.parse("avg_bits=1.5"),
                                session.specs)
        strategy.get("shapley-loop", "transformer")(problem)


def test_run_ptq_defaults_to_it(session, tmp_path):
    s = run_ptq(session.model_name, "avg_bits=3.5", out=tmp_path, candidates=CANDS,
                settings=SMALL, options={"n_evaluations": 10, "top_k": 2})
    assert s["method"] == "shapley-loop"
    assert all(r["ok"] for r in s["budget_check"])
    assert (tmp_path / "engine_state.json").is_file()
    contrib = json.loads((tmp_path / "contributions.json").read_text())
    assert contrib["engine"]["evaluations"] <= 10 and "value_curve" in contrib["engine"]


def test_value_on_the_validation_split(session, tmp_path):
    res = _run(session, out=tmp_path, value_split="val")
    assert (tmp_path / "engine_state_val.json").is_file()
    assert not (tmp_path / "engine_state.json").exists()
    keys = session.candidates.keys
    with session.swapper.applied({n: keys[k] for g, k in
                                  zip(session.groups, res.detail.choice, strict=True)
                                  for n in g}):
        kl = kl_to_float(session.model, session.refs["val"])
    assert res.info["engine"]["best_value"] == pytest.approx(-math.log(kl + 1e-9), rel=1e-9)
    with pytest.raises(SmpqError, match="value split"):
        _run(session, value_split="test")


def test_negative_nll_value(session, tmp_path):
    from smpq.transformer.values import nll

    res = _run(session, out=tmp_path, metric="neg_nll")
    assert (tmp_path / "engine_state_neg_nll.json").is_file()
    keys = session.candidates.keys
    with session.swapper.applied({n: keys[k] for g, k in
                                  zip(session.groups, res.detail.choice, strict=True)
                                  for n in g}):
        want = -nll(session.model, session.refs["calib"].blocks)
    assert res.info["engine"]["best_value"] == pytest.approx(want, rel=1e-9)
    with pytest.raises(SmpqError, match="value metric"):
        _run(session, metric="acc")


def test_prior_gains_are_score_differences_up_each_ladder():
    """Two groups, candidates listed [c0, c1, c2] with ladder order (cheapest first) 2, 0, 1:
    step k of group g gains score[g][order[k]] - score[g][order[k-1]], by hand."""
    import numpy as np

    from smpq.engine.space import PolicySpace
    from smpq.transformer.engine_strategy import prior_gains

    costs = {"size": (np.array([1.0, 2.0, 3.0]),) * 2}
    sp = PolicySpace(("a", "b"), ((3,), (3,)), costs, {}, {"size": 6.0}, ("w",))
    order = np.array([2, 0, 1])
    scores = [[-1.0, 0.0, -5.0], [-2.0, -0.5, -3.0]]
    # group a: levels are c2 (-5), c0 (-1), c1 (0): gains 4, 1; group b: -3, -2, -0.5: 1, 1.5
    assert prior_gains(sp, (order, order), scores).tolist() == [4.0, 1.0, 1.0, 1.5]


@pytest.mark.parametrize("options, match", [
    ({"guided": "yes"}, "guided"), ({"engine_share": 0}, "engine_share"),
    ({"engine_share": 1.5}, "engine_share"), ({"block_tokens": 0}, "block_tokens"),
    ({"block_tokens": 2.5}, "block_tokens"), ({"screen_blocks": 0}, "screen_blocks"),
    ({"offspring": 2.5}, "offspring"), ({"survivors": 0}, "survivors"),
    ({"offspring": 2, "survivors": 3}, "survivors"),
])
def test_bad_guided_options_are_one_line_errors_before_any_scoring(session, monkeypatch,
                                                                    options, match):
    import smpq.transformer.engine_strategy as es

    def no_priors(*args):
        raise AssertionError("options are checked before the priors are scored")

    monkeypatch.setattr(es, "_priors", no_priors)
    with pytest.raises(SmpqError, match=match) as err:
        _run(session, **options)
    assert len(str(err.value).splitlines()) == 1
