"""SMPQ/DMPQ searches on a tiny MLP: budgets hold, runs are deterministic and resumable."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from smpq.cnn.data import get_splits
from smpq.cnn.models import build_model
from smpq.cnn.pipeline import calibration_batches
from smpq.cnn.search import SearchConfig, derive_budgeted, search
from smpq.cnn.supernet import Supernet
from smpq.cnn.train import TrainConfig, save_checkpoint, train
from smpq.cnn.values import SubsetValue, stack_dataset
from smpq.cost import Budget, trace_costs
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.shapley import ShapleyConfig, exact_shapley, permutation_shapley
from smpq.spec import LayerChoice, act_spec, weight_spec

FAST = dict(epochs=2, permutations=2, w_bits=(2, 4), a_bits=(4, 8), val_samples=120,
            batch_size=128)


@pytest.fixture(scope="module")
def setup():
    splits = get_splits("digits")
    model = build_model("mlp", splits.input_shape, splits.num_classes, seed=0,
                        hidden=(32, 16))
    train(model, splits.train, TrainConfig(epochs=3, seed=0))
    cost = trace_costs(model, splits.val[0][0][None])
    return model.eval(), splits, cost


def _run(setup, budget="bitops=uniform:3/3", **kw):
    model, splits, cost = setup
    cfg = SearchConfig(**{**FAST, **kw})
    return search(model, splits.train, splits.val, cost, Budget.parse(budget), cfg)


@pytest.mark.parametrize("method", ["smpq", "dmpq"])
def test_derived_policy_meets_budget_and_is_deterministic(setup, method):
    _, _, cost = setup
    a = _run(setup, method=method)
    b = _run(setup, method=method)
    assert a.policy.layers == b.policy.layers
    assert np.allclose(a.supernet.alphas(), b.supernet.alphas())
    for row in Budget.parse("bitops=uniform:3/3").check(cost, a.policy):
        assert row["ok"], row
    assert a.evaluations > 0 and len(a.history) == 2


def test_smpq_moves_alpha_and_records_contributions(setup):
    out = _run(setup, method="smpq")
    players = out.contributions["players"]
    assert len(players) == 3 * 4  # 3 layers x (2 weight + 2 activation candidates)
    assert all(p["n_samples"] >= 1 for p in players)
    assert not np.allclose(out.supernet.alphas(), 0.0)


def test_argmax_derivation_is_repaired_when_over_budget(setup):
    _, _, cost = setup
    out = _run(setup, method="smpq", derive="argmax", budget="bitops=uniform:2/4")
    for row in Budget.parse("bitops=uniform:2/4").check(cost, out.policy):
        assert row["ok"]


def test_infeasible_budget_fails_before_training(setup):
    with pytest.raises(SmpqError, match="cheapest reachable"):
        _run(setup, budget="bitops=0.5*uniform:2/4")


def test_bad_search_config():
    with pytest.raises(SmpqError):
        SearchConfig(method="nas")
    with pytest.raises(SmpqError):
        SearchConfig(w_bits=(2, 9))
    with pytest.raises(SmpqError):
        SearchConfig(epochs=2, warmup=2)


def test_budgeted_derivation_equals_brute_force(setup):
    _, _, cost = setup
    rng = np.random.default_rng(0)
    w_specs, a_specs = [weight_spec(b) for b in (2, 4, 8)], [act_spec(b) for b in (4, 8)]
    scores = {n: (rng.normal(size=3), rng.normal(size=2)) for n in cost.names}
    budget = Budget.parse("bitops=uniform:4/4,avg_bits=5")
    d = derive_budgeted(cost, scores, w_specs, a_specs, budget, {})
    best = -np.inf
    for combo in itertools.product(range(3), range(2), repeat=len(cost.names)):
        pol, s = {}, 0.0
        for k, n in enumerate(cost.names):
            wi, ai = combo[2 * k], combo[2 * k + 1]
            pol[n] = LayerChoice(w_specs[wi], a_specs[ai])
            s += scores[n][0][wi] + scores[n][1][ai]
        if all(r["ok"] for r in budget.check(cost, Policy(pol))):
            best = max(best, s)
    got = sum(scores[n][0][[s.bits for s in w_specs].index(c.w_bits)]
              + scores[n][1][[s.bits for s in a_specs].index(c.a_bits)]
              for n, c in d.policy.layers.items())
    assert got == pytest.approx(best)


def test_supernet_game_matches_exact_shapley(setup):
    """Permutation sampling on the real supernet game agrees with enumeration (8 players)."""
    import copy

    model, splits, _ = setup
    net_model = copy.deepcopy(model)
    net = Supernet(net_model, [weight_spec(2), weight_spec(8)], [act_spec(4), act_spec(8)],
                   layers=["net.1", "net.3"])
    from smpq.apply import calibrate_

    calibrate_(net_model, calibration_batches(splits.train, 128))
    x, y = stack_dataset(splits.val, 200)
    value = SubsetValue(net, x, y, metric="neg_loss")
    assert net.n_players == 8
    exact = exact_shapley(value, net.n_players)
    mc = permutation_shapley(value, net.n_players, ShapleyConfig(permutations=400, seed=1))
    # efficiency holds exactly for untruncated sampling; estimates within ~4 standard errors
    assert mc.estimate.sum() == pytest.approx(exact.estimate.sum(), abs=1e-6)
    assert np.all(np.abs(mc.estimate - exact.estimate) <= 4 * mc.stderr + 1e-6)


def test_resume_after_kill_reaches_same_policy(tmp_path):
    splits = get_splits("digits")
    model = build_model("mlp", splits.input_shape, splits.num_classes, seed=0, hidden=(32, 16))
    train(model, splits.train, TrainConfig(epochs=2, seed=0))
    save_checkpoint(tmp_path / "fp", model, {"dataset": "digits"})
    args = [sys.executable, "-m", "smpq.cli", "search", "--method", "smpq",
            "--checkpoint", str(tmp_path / "fp"),
            "--epochs", "8", "--permutations", "4", "--w-bits", "2,4", "--a-bits", "4,8",
            "--finetune-epochs", "0", "--no-compare", "--no-pin"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 2:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed; make it longer"
    assert json.loads(state.read_text())["epoch"] < 8
    res = subprocess.run([*args, "--out", str(out), "--resume"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "ref" / "policy.json").read_text())
    b = json.loads((out / "policy.json").read_text())
    assert a["layers"] == b["layers"]
    ca = json.loads((tmp_path / "ref" / "contributions.json").read_text())["layers"]
    cb = json.loads((out / "contributions.json").read_text())["layers"]
    for name in ca:
        assert np.allclose(ca[name]["alpha_w"], cb[name]["alpha_w"])


def test_resume_without_checkpoint_is_an_error(setup, tmp_path):
    model, splits, cost = setup
    with pytest.raises(SmpqError, match="nothing to resume"):
        search(model, splits.train, splits.val, cost, Budget.parse("bitops=uniform:3/3"),
               SearchConfig(**FAST), out=tmp_path, resume=True)


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no `except Exception` can swallow it."""


class _KillDuringSave:
    """Wraps _save; during the save of `epoch`, raises _Killed before file operation `step`.

    The file operations counted are os.replace (every atomic rename) and os.unlink.
    """

    def __init__(self, real_save, epoch: int, step: int):
        self.real_save, self.epoch, self.step, self.left = real_save, epoch, step, None

    def save(self, ckpt, model, state, optims):
        self.left = self.step if state["epoch"] == self.epoch else None
        try:
            self.real_save(ckpt, model, state, optims)
        finally:
            self.left = None

    def file_op(self, real):
        def op(*args, **kw):
            if self.left is not None:
                self.left -= 1
                if self.left == 0:
                    self.left = None
                    raise _Killed
            return real(*args, **kw)
        return op


def _search_to(setup, out, resume=False):
    model, splits, cost = setup
    return search(model, splits.train, splits.val, cost, Budget.parse("bitops=uniform:3/3"),
                  SearchConfig(**FAST), out=out, resume=resume)


def test_kill_at_every_step_of_a_checkpoint_write_resumes_to_the_same_result(
        setup, tmp_path, monkeypatch):
    """Kill before each rename/unlink of the epoch-2 checkpoint write, then resume.

    Epoch 2 (the last of FAST's two) is a search epoch: alpha moves, so resuming its weights
    with epoch-1 state would move alpha twice. The reference is an uninterrupted run.
    """
    import importlib

    module = importlib.import_module("smpq.cnn.search.supernet_search")
    ref = _search_to(setup, tmp_path / "ref")
    kills = 0
    for step in range(1, 20):
        kill = _KillDuringSave(module._save, epoch=2, step=step)
        out = tmp_path / f"killed{step}"
        with monkeypatch.context() as m:
            m.setattr(module, "_save", kill.save)
            m.setattr(os, "replace", kill.file_op(os.replace))
            m.setattr(os, "unlink", kill.file_op(os.unlink))
            try:
                _search_to(setup, out)
            except _Killed:
                killed = True
            else:
                killed = False
        if not killed:  # the save has fewer file operations than `step`: every one was tried
            break
        kills += 1
        got = _search_to(setup, out, resume=True)
        assert got.policy.layers == ref.policy.layers, f"kill before file operation {step}"
        assert np.allclose(got.supernet.alphas(), ref.supernet.alphas(), rtol=0, atol=1e-6), step
        assert [h["epoch"] for h in got.history] == [0, 1]
        assert [p["ema"] for p in got.contributions["players"]] == pytest.approx(
            [p["ema"] for p in ref.contributions["players"]], abs=1e-9)
    assert kills >= 2, "a checkpoint write has at least two steps (tensors, state)"


def test_damaged_or_incomplete_checkpoint_is_a_one_line_error(setup, tmp_path):
    _search_to(setup, tmp_path)
    ckpt = tmp_path / "checkpoint"
    names = sorted(p.name for p in ckpt.iterdir())
    assert len(names) == 2 and "state.json" in names, names  # older tensor files removed
    tensor_file = ckpt / next(n for n in names if n != "state.json")
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 1
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(SmpqError, match="damaged"):
        _search_to(setup, tmp_path, resume=True)
    tensor_file.unlink()
    with pytest.raises(SmpqError, match="incomplete"):
        _search_to(setup, tmp_path, resume=True)
