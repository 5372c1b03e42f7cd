"""`smpq derive --from RUN_DIR`: a finished search re-derived at other budgets, no search.

One real tiny search per module (the settings of test_search/test_cli); the references are a
brute force over every policy of the two searched layers, scored from contributions.json and
costed from the model's own Linear shapes (MACs = in x out per sample).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
from rich.console import Console
from torch import nn

import smpq.cli as cli
from smpq.cli import main
from smpq.cnn.models import build_model
from smpq.cnn.search.derive import rederive
from smpq.cnn.train import save_checkpoint
from smpq.errors import SmpqError
from smpq.policy import Policy

W_BITS, A_BITS = (2, 4), (4, 8)
HIDDEN = (32, 16, 16)
RUN_BUDGET = "bitops=uniform:4/4"  # leaves several policies of the searched layers


def _main(args) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["smpq", *map(str, args)])
        mp.setattr(cli, "console", Console(file=out, width=160))
        mp.setattr(cli, "err_console", Console(file=err, width=400))
        with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exc:
            main()
    return exc.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model():
    return build_model("mlp", (1, 8, 8), 10, seed=0, hidden=HIDDEN)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, model, {"dataset": "digits"})
    return d


def _search(ckpt, out, method: str):
    code, _, err = _main(["search", "--method", method, "--checkpoint", ckpt, "--epochs", 2,
                          "--permutations", 2, "--w-bits", "2,4", "--a-bits", "4,8",
                          "--finetune-epochs", 0, "--no-compare",
                          "--budget", RUN_BUDGET, "--out", out])
    assert code in (0, None), err
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ckpt):
    return _search(ckpt, tmp_path_factory.mktemp("run") / "smpq", "smpq")


@pytest.fixture(scope="module")
def dmpq_dir(tmp_path_factory, ckpt):
    return _search(ckpt, tmp_path_factory.mktemp("run") / "dmpq", "dmpq")


def _linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _scores(run_dir) -> dict[str, dict[tuple[str, int], float]]:
    """Per searched layer, (kind, bits) -> averaged Shapley estimate, read from the file."""
    contrib = json.loads((run_dir / "contributions.json").read_text())
    assert contrib["players"], "the run should have had a search epoch"
    out: dict[str, dict] = {}
    for p in contrib["players"]:
        out.setdefault(p["layer"], {})[(p["kind"], p["bits"])] = p["ema"]
    return out


def _brute_force(model, run_dir, limit_of) -> tuple[float, dict[str, tuple[int, int]], int]:
    """Best total score (and its pick) over every (w, a) per searched layer whose BitOps meet
    the limit, and how many such policies there are."""
    lin = _linears(model)
    names = list(lin)
    pinned = {names[0]: (8, 8), names[-1]: (8, 8)}
    scores = _scores(run_dir)
    searched = [n for n in names if n not in pinned]
    assert set(scores) == set(searched) and len(searched) == 2
    macs = {n: m.in_features * m.out_features for n, m in lin.items()}
    limit = limit_of(macs, pinned, searched)
    best, best_pick, feasible = -float("inf"), None, 0
    for pick in itertools.product(itertools.product(W_BITS, A_BITS), repeat=len(searched)):
        chosen = dict(zip(searched, pick, strict=True))
        bitops = sum(macs[n] * w * a for n, (w, a) in {**pinned, **chosen}.items())
        total = sum(scores[n][("w", w)] + scores[n][("a", a)] for n, (w, a) in chosen.items())
        feasible += bitops <= limit * (1 + 1e-9)
        if bitops <= limit * (1 + 1e-9) and total > best:
            best, best_pick = total, chosen
    return best, best_pick, feasible


def _total(policy: Policy, run_dir) -> float:
    scores = _scores(run_dir)
    return sum(scores[n][("w", policy.layers[n].w_bits)] + scores[n][("a", policy.layers[n].a_bits)]
               for n in scores)


def _uniform(w, a):
    def limit(macs, pinned, searched):
        return sum(macs[n] * w * a for n in searched) + sum(
            macs[n] * pw * pa for n, (pw, pa) in pinned.items())
    return limit


@pytest.mark.parametrize("which", ["run_dir", "dmpq_dir"])  # Shapley estimates; log softmax(alpha)
def test_rederive_at_the_runs_own_budget_gives_the_runs_policy(request, which):
    run = request.getfixturevalue(which)
    own = Policy.load(run / "policy.json")
    assert rederive(run, RUN_BUDGET).layers == own.layers


def test_the_runs_budget_leaves_a_choice(run_dir, model):
    feasible = _brute_force(model, run_dir, _uniform(4, 4))[2]
    assert feasible >= 3  # so that re-deriving the run's policy is not forced


def test_looser_budget_scores_at_least_as_much_and_fits(run_dir, model):
    own = Policy.load(run_dir / "policy.json")
    loose = rederive(run_dir, "bitops=uniform:5/5")
    best, pick, _ = _brute_force(model, run_dir, _uniform(5, 5))
    assert _total(loose, run_dir) == pytest.approx(best, abs=1e-12)
    assert _total(loose, run_dir) >= _total(own, run_dir) - 1e-12
    assert loose.layers.keys() == own.layers.keys() and pick  # (ties: the pick may differ)
    macs = {n: m.in_features * m.out_features for n, m in _linears(model).items()}
    assert sum(macs[n] * c.w_bits * c.a_bits for n, c in loose.layers.items()) <= \
        _uniform(5, 5)(macs, {n: (8, 8) for n in (list(macs)[0], list(macs)[-1])},
                       list(macs)[1:-1])  # it fits, costed by hand
    assert loose.meta["budget"] == "bitops=uniform:5/5"
    assert loose.meta["searched_at"] == RUN_BUDGET


def test_cli_writes_the_policy_and_prints_the_check(run_dir, model, tmp_path):
    out = tmp_path / "d"
    code, stdout, err = _main(["derive", "--from", run_dir, "--budget", "bitops=uniform:5/5",
                               "--out", out])
    assert code in (0, None), err
    got = Policy.load(out / "policy.json")
    assert got.layers == rederive(run_dir, "bitops=uniform:5/5").layers
    assert "bitops=uniform:5/5" in stdout and "yes" in stdout and "NO" not in stdout


def test_cli_scoped_budget_counts_only_the_searched_layers(run_dir, model, tmp_path):
    # 0.9 x the searched layers at uniform 5/5; the pinned 8/8 layers are left out of it
    def limit(macs, pinned, searched):
        return 0.9 * sum(macs[n] * 25 for n in searched) + sum(macs[n] * 64 for n in pinned)

    code, stdout, err = _main(["derive", "--from", run_dir, "--budget",
                               "bitops@searched=0.9*uniform:5/5", "--out", tmp_path / "s"])
    assert code in (0, None), err
    got = Policy.load(tmp_path / "s" / "policy.json")
    best, pick, _ = _brute_force(model, run_dir, limit)
    assert _total(got, run_dir) == pytest.approx(best, abs=1e-12)  # (ties may pick another)
    lin = _linears(model)
    searched_bitops = sum(lin[n].in_features * lin[n].out_features * got.layers[n].w_bits *
                          got.layers[n].a_bits for n in pick)
    assert searched_bitops <= 0.9 * 25 * (32 * 16 + 16 * 16)  # by hand: the searched MACs
    assert "bitops@searched=0.9*uniform:5/5" in stdout
    assert f"{searched_bitops:.4g}" in stdout or f"{searched_bitops:.3e}" in stdout


def test_cli_default_out_is_inside_the_run(run_dir):
    code, stdout, err = _main(["derive", "--from", run_dir, "--budget", "avg_bits=7"])
    assert code in (0, None), err
    written = list((run_dir / "derived").glob("*/policy.json"))
    assert [p.parent.name for p in written] == ["avg_bits=7"]


def _copy(run_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("derived", "checkpoint"))
    return bad


def _corrupt_text(run_dir, tmp_path):
    bad = _copy(run_dir, tmp_path)
    (bad / "contributions.json").write_text("{not json")
    return bad


def _corrupt_ema(run_dir, tmp_path):
    bad = _copy(run_dir, tmp_path)
    c = json.loads((bad / "contributions.json").read_text())
    c["players"][0]["ema"] = "high"
    (bad / "contributions.json").write_text(json.dumps(c))
    return bad


def _drop_layer_bits(run_dir, tmp_path):
    bad = _copy(run_dir, tmp_path)
    c = json.loads((bad / "contributions.json").read_text())
    next(iter(c["layers"].values()))["w_bits"] = [3]
    (bad / "contributions.json").write_text(json.dumps(c))
    return bad


def _no_contributions(run_dir, tmp_path):
    bad = _copy(run_dir, tmp_path)
    (bad / "contributions.json").unlink()
    return bad


@pytest.mark.parametrize("make,budget,message", [
    (lambda r, t: t / "nowhere", "avg_bits=7", "no search output at"),
    (lambda r, t: t, "avg_bits=7", "not a search output"),
    (_no_contributions, "avg_bits=7", "no contributions.json"),
    (_corrupt_text, "avg_bits=7", "malformed .*contributions.json"),
    (_corrupt_ema, "avg_bits=7", "malformed .*contributions.json"),
    (_drop_layer_bits, "avg_bits=7", "malformed .*contributions.json"),
    (lambda r, t: r, "bitops=0.05*uniform:2/2", "budget infeasible: bitops limit"),
    (lambda r, t: r, "bitops@nowhere=uniform:2/2", "unknown budget scope"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(run_dir, tmp_path, make, budget,
                                                          message):
    src = make(run_dir, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _main(["derive", "--from", src, "--budget", budget, "--out", out])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err and not out.exists()


def test_out_may_not_be_the_run_folder(run_dir):
    before = (run_dir / "policy.json").read_bytes()
    code, _, err = _main(["derive", "--from", run_dir, "--budget", "avg_bits=7",
                          "--out", run_dir])
    assert code == 2 and "must not be the run folder" in err
    assert (run_dir / "policy.json").read_bytes() == before


def test_api_errors_are_smpq_errors(tmp_path):
    with pytest.raises(SmpqError, match="no search output"):
        rederive(tmp_path / "missing", "avg_bits=4")


def test_derive_into_a_users_own_folder_is_refused_and_changes_nothing(run_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "policy.json").write_text("my own policy\n")
    code, _, err = _main(["derive", "--from", run_dir, "--budget", "avg_bits=7",
                          "--out", mine])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert (mine / "policy.json").read_text() == "my own policy\n"
    assert sorted(p.name for p in mine.iterdir()) == ["policy.json"]
