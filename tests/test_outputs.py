"""Nothing lost: output folders are locked, swapped in whole, checked before any work; an
impossible budget fails before any training; Ctrl-C in a search says how to resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import smpq.fileio as fileio
from smpq.cli import main
from smpq.cnn.models import build_model
from smpq.cnn.train import save_checkpoint
from smpq.errors import SmpqError
from smpq.fileio import output_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST_SEARCH = ["--method", "smpq", "--epochs", "2", "--permutations", "2", "--w-bits", "2,4",
               "--a-bits", "4,8", "--finetune-epochs", "0", "--no-compare"]
FAST_ENGINE = ["--evaluations", "24", "--top-k", "2", "--no-pin", "--finetune-epochs", "0",
               "--no-compare"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, build_model("mlp", (1, 8, 8), 10, seed=0), {"dataset": "digits"})
    return d


def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["smpq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def no_work(monkeypatch) -> None:
    """Any float-model training or loading fails the test: checks must come first."""
    import smpq.cli
    import smpq.cnn.train

    def boom(*args, **kwargs):
        raise AssertionError("expensive work started before the check")

    monkeypatch.setattr(smpq.cli, "fp_model", boom)
    monkeypatch.setattr(smpq.cnn.train, "fp_checkpoint", boom)
    monkeypatch.setattr(smpq.cnn.train, "train", boom)


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_bytes().decode("latin-1")
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- output_dir -----------------------------------------------------------------------------

def test_failed_write_keeps_the_previous_output_whole(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as stage:
        (stage / "policy.json").write_text("old policy")
        (stage / "model").mkdir()
        (stage / "model" / "w").write_text("old weights")
    before = tree(out)
    with pytest.raises(OSError, match="disk full"), output_dir(out) as stage:
        (stage / "policy.json").write_text("new policy")
        raise OSError("disk full")  # e.g. while writing the model
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no staging left


def test_success_replaces_our_folder_whole_and_keeps_resumable_state(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, keep=("checkpoint",)) as stage:
        (stage / "stale.png").write_text("from the first run")
    (out / "checkpoint").mkdir()  # a search writes its checkpoint straight into out
    (out / "checkpoint" / "state.json").write_text("{}")
    with output_dir(out, keep=("checkpoint",)) as stage:
        (stage / "policy.json").write_text("new")
    got = tree(out)
    assert got.pop(fileio.OUTPUT_MARKER)
    assert got == {"policy.json": "new", "checkpoint/state.json": "{}"}


def users_folder(folder: Path) -> dict[str, str]:
    """A folder of the user's own (no smpq marker) whose names collide with smpq's outputs."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "thesis.tex").write_text("\\chapter{mine}")
    (folder / "policy.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("mine")
    return tree(folder)


def test_a_folder_smpq_did_not_make_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "mine"
    before = users_folder(out)
    with pytest.raises(SmpqError, match=r"mine already holds files smpq did not write "
                                        r"\(model/, notes.txt, policy.json\)"):
        with output_dir(out):
            raise AssertionError("the claim must fail before the work")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no lock, no staging left


def test_a_folder_holding_only_resumable_state_is_claimed_and_the_state_kept(tmp_path):
    out = tmp_path / "out"  # a first run killed before its swap: state only, no marker
    out.mkdir()
    (out / "engine_state.json").write_text("{}")
    (out / ".engine_state.json.x1y2.tmp").write_text("half")  # killed mid-write
    with output_dir(out, keep=("engine_state.json",)) as stage:
        (stage / "policy.json").write_text("new")
    got = tree(out)
    assert got.pop(fileio.OUTPUT_MARKER)
    assert got == {"policy.json": "new", "engine_state.json": "{}",
                   ".engine_state.json.x1y2.tmp": "half"}


def test_quantize_into_a_users_folder_fails_before_work_and_deletes_nothing(
        monkeypatch, capsys, tmp_path):
    out = tmp_path / "mine"
    before = users_folder(out)
    no_work(monkeypatch)
    code, _, err = cli(monkeypatch, capsys, "quantize", "--uniform", "4/4", "--out", out)
    one_error_line(code, err, str(out), "model/", "notes.txt", "policy.json")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_run_killed_between_the_two_renames_gets_the_previous_output_back(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.old").mkdir()  # out renamed away, the new folder not yet renamed in
    (tmp_path / ".out.old" / "policy.json").write_text("previous")
    (tmp_path / ".out.new").mkdir()
    with pytest.raises(RuntimeError), output_dir(out):
        assert tree(out) == {"policy.json": "previous"}
        raise RuntimeError
    assert tree(out) == {"policy.json": "previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_lock_file_from_a_dead_run_does_not_block(tmp_path):
    (tmp_path / "out.lock").write_text("999999\n")  # flock died with its process
    with output_dir(tmp_path / "out") as stage:
        (stage / "a").write_text("x")
    assert (tmp_path / "out" / "a").is_file()


def test_a_second_claim_on_a_held_folder_names_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from smpq.fileio import output_dir
        with output_dir({str(out)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SmpqError, match=rf"{out}.*in use.*pid {holder.pid}"):
            with output_dir(out):
                pass
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    with output_dir(out):  # released: free again
        pass


# -- the commands ---------------------------------------------------------------------------

def test_two_searches_on_one_out_folder_second_fails_at_once(monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from smpq.fileio import output_dir
        with output_dir({str(out)!r}, keep=("checkpoint",)):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "held"
        no_work(monkeypatch)
        code, _, err = cli(monkeypatch, capsys, "search", "--out", out, *FAST_SEARCH)
        one_error_line(code, err, str(out), f"pid {holder.pid}")
    finally:
        holder.communicate("", timeout=30)


@pytest.mark.parametrize("command", ["search", "compare", "run", "train", "quantize"])
def test_out_that_is_a_file_fails_before_any_work(monkeypatch, capsys, tmp_path, command):
    (tmp_path / "out").write_text("not a folder")
    no_work(monkeypatch)
    extra = ["--uniform", "4/4"] if command == "quantize" else []
    code, _, err = cli(monkeypatch, capsys, command, "--out", tmp_path / "out", *extra)
    one_error_line(code, err, str(tmp_path / "out"), "file")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_read_only_out_fails_before_any_work(monkeypatch, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: fake a read-only mount
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != ro and real_access(
            p, mode, **kw))
    else:
        ro.chmod(0o555)
    no_work(monkeypatch)
    try:
        code, _, err = cli(monkeypatch, capsys, "search", "--out", ro / "run", *FAST_SEARCH)
    finally:
        ro.chmod(0o755)
    one_error_line(code, err, str(ro / "run"), "read-only")


def test_quantize_failing_while_writing_leaves_the_previous_output(monkeypatch, capsys, ckpt,
                                                                    tmp_path):
    import smpq.cnn.train

    out = tmp_path / "q"
    code, _, err = cli(monkeypatch, capsys, "quantize", "--checkpoint", ckpt, "--uniform", "8/8",
                       "--out", out)
    assert code == 0, err
    before = tree(out)
    assert json.loads(before["policy.json"])["layers"]
    real = smpq.cnn.train.save_checkpoint

    def full_disk(directory, model, meta):
        if Path(directory).name == "model":  # the quantized weights: written last
            raise OSError(28, "No space left on device")
        return real(directory, model, meta)

    monkeypatch.setattr(smpq.cnn.train, "save_checkpoint", full_disk)
    code, _, err = cli(monkeypatch, capsys, "quantize", "--checkpoint", ckpt, "--uniform", "4/4",
                       "--out", out)
    one_error_line(code, err, "no space left on device", "keeps its previous outputs")
    assert tree(out) == before  # not a 4/4 policy and metrics beside the 8/8 model


def test_ctrl_c_in_a_search_keeps_the_checkpoint_and_says_how_to_resume(
        monkeypatch, capsys, ckpt, tmp_path):
    import smpq.cnn.search.supernet_search as ss

    out = tmp_path / "s"
    real = ss._save

    def save_then_interrupt(ckpt_dir, model, state, optims):
        real(ckpt_dir, model, state, optims)
        raise KeyboardInterrupt  # what SIGINT raises in the main thread

    monkeypatch.setattr(ss, "_save", save_then_interrupt)
    args = ["search", "--checkpoint", ckpt, "--out", out, *FAST_SEARCH]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(out / "checkpoint") in lines[0] and "after epoch 1" in lines[0]
    assert lines[0].rstrip().endswith("--resume")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 1
    assert not (out / "policy.json").exists()

    monkeypatch.setattr(ss, "_save", real)
    code, _, err = cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert json.loads((out / "policy.json").read_text())["layers"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epoch"] == 2


def test_ctrl_c_in_the_default_search_keeps_its_state_and_resumes_to_the_same_policy(
        monkeypatch, capsys, ckpt, tmp_path):
    import smpq.cnn.search.engine_search as es

    ref = tmp_path / "ref"
    code, _, err = cli(monkeypatch, capsys, "search", "--checkpoint", ckpt, "--out", ref,
                       *FAST_ENGINE)
    assert code == 0, err
    assert len(json.loads((ref / "contributions.json").read_text())["rounds"]) >= 3
    out = tmp_path / "s"
    real, calls = es._engine_value, {"n": 0}

    def value_then_interrupt(values, metric):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the loop, after the screening's checkpoint
            raise KeyboardInterrupt
        return real(values, metric)

    monkeypatch.setattr(es, "_engine_value", value_then_interrupt)
    args = ["search", "--checkpoint", ckpt, "--out", out, *FAST_ENGINE]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(out / "engine_state.json") in lines[0] and lines[0].rstrip().endswith("--resume")
    assert (out / "engine_state.json").is_file() and not (out / "policy.json").exists()
    monkeypatch.setattr(es, "_engine_value", real)
    code, _, err = cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    got = json.loads((out / "policy.json").read_text())["layers"]
    assert got == json.loads((ref / "policy.json").read_text())["layers"]


# -- impossible budgets fail before training ------------------------------------------------

@pytest.mark.parametrize("command", ["search", "compare", "run"])
def test_infeasible_budget_fails_before_the_float_model_is_trained(monkeypatch, capsys, tmp_path,
                                                                  command):
    no_work(monkeypatch)
    code, _, err = cli(monkeypatch, capsys, command, "--model", "mlp", "--cache",
                       tmp_path / "cache", "--budget", "avg_bits=1", "--out", tmp_path / "o")
    one_error_line(code, err, "avg_bits")
    assert not (tmp_path / "o").exists()


def test_ptq_infeasible_budget_fails_before_the_tiny_lm_is_trained(monkeypatch, capsys,
                                                                   tmp_path):
    import smpq.transformer.tiny_lm as tiny

    def boom(*args, **kwargs):
        raise AssertionError("trained the tiny LM before checking the budget")

    monkeypatch.chdir(tmp_path)  # no cached tiny LM here
    monkeypatch.setattr(tiny, "train_tiny_lm", boom)
    code, _, err = cli(monkeypatch, capsys, "ptq", "--budget", "avg_bits=1.0", "--out",
                       tmp_path / "p")
    one_error_line(code, err, "avg_bits")
    assert not (tmp_path / "p").exists()


def test_quantize_under_a_file_size_limit_leaves_the_previous_output(ckpt, tmp_path):
    """The real thing (`ulimit -f`): the weights file outgrows the limit mid-write."""
    import resource

    out = tmp_path / "q"
    args = [sys.executable, "-m", "smpq.cli", "quantize", "--checkpoint", str(ckpt), "--out",
            str(out)]
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    first = subprocess.run([*args, "--uniform", "8/8"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    before = tree(out)
    weights = max(len(v) for k, v in before.items() if k.startswith("model/"))
    limit = max(len(v) for k, v in before.items() if not k.startswith("model/")) + 1024
    assert limit < weights, "the test needs weights larger than the other files"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    second = subprocess.run([*args, "--uniform", "4/4"], env=env, capture_output=True,
                            text=True, timeout=300, preexec_fn=small_files)
    one_error_line(second.returncode, second.stderr, "no space left on device",
                   str(out / "model"), "File too large", "keeps its previous outputs")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# -- hostile output paths, disk full, --resume with nothing to resume, Ctrl-C at start-up -----

def test_an_empty_out_path_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # would have been written into
    no_work(monkeypatch)
    for command in (["quantize", "--uniform", "4/4"], ["search"], ["ptq"]):
        code, _, err = cli(monkeypatch, capsys, *command, "--out", "")
        one_error_line(code, err, "empty path")
    with pytest.raises(SmpqError, match="empty path"), output_dir(""):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_loop_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    no_work(monkeypatch)
    code, _, err = cli(monkeypatch, capsys, "quantize", "--uniform", "4/4", "--out",
                       tmp_path / "a")
    one_error_line(code, err, str(tmp_path / "a"), "symlink loop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


def test_a_symlink_to_a_folder_in_use_is_locked_out_and_stays_a_symlink(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    with output_dir(real) as stage:
        (stage / "policy.json").write_text("first")
    link.symlink_to(real)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from smpq.fileio import output_dir
        with output_dir({str(real)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SmpqError, match=rf"in use.*pid {holder.pid}"), output_dir(link):
            pass
    finally:
        holder.communicate("", timeout=30)
    with output_dir(link, keep=("engine_state.json",)) as stage:  # free: written through
        (stage / "policy.json").write_text("second")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "policy.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_failed_claim_leaves_no_empty_folder_behind(tmp_path):
    with pytest.raises(RuntimeError), output_dir(tmp_path / "a" / "b" / "out"):
        raise RuntimeError("e.g. an impossible budget, found after the claim")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["search", *FAST_SEARCH], ["search", *FAST_ENGINE],
                                  ["search", "--method", "random", *FAST_ENGINE[:2]],
                                  ["ptq"], ["ptq", "--method", "shapley"],
                                  ["ptq", "--method", "fisher"]])
def test_resume_with_nothing_to_resume_is_refused_before_any_work(monkeypatch, capsys, tmp_path,
                                                                  args):
    import smpq.transformer.run as tr

    def boom(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(tr, "PTQSession", boom)
    no_work(monkeypatch)
    code, _, err = cli(monkeypatch, capsys, *args, "--out", tmp_path / "o", "--resume")
    one_error_line(code, err, "nothing to resume", "without --resume")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_the_search_state_keeps_the_previous_state(
        monkeypatch, capsys, ckpt, tmp_path):
    out = tmp_path / "s"
    args = ["search", "--checkpoint", ckpt, "--out", out, *FAST_ENGINE]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    before = tree(out)
    assert "engine_state.json" in before

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)  # the first write: the screening's state
    code, _, err = cli(monkeypatch, capsys, *args, "--seed", "1")
    one_error_line(code, err, "no space left on device", str(out / "engine_state.json"),
                   "keeps its previous outputs")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_disk_full_inside_safetensors_is_one_line_and_keeps_the_previous_model(
        monkeypatch, capsys, ckpt, tmp_path):
    import safetensors.torch

    out = tmp_path / "q"
    code, _, err = cli(monkeypatch, capsys, "quantize", "--checkpoint", ckpt, "--uniform", "8/8",
                       "--out", out)
    assert code == 0, err
    before = tree(out)
    error = type("SafetensorError", (Exception,), {})  # safetensors' own, wrapping errno 28

    def full(*a, **k):
        raise error('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = cli(monkeypatch, capsys, "quantize", "--checkpoint", ckpt, "--uniform", "4/4",
                       "--out", out)
    one_error_line(code, err, "no space left on device", "model.safetensors")
    assert tree(out) == before


def _start_interrupted(tmp_path, module_code: str) -> subprocess.CompletedProcess:
    """Run `smpq quantize` with a sitecustomize that raises KeyboardInterrupt (what SIGINT
    raises) while `module_code` runs, i.e. while torch or the command loads."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(module_code)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{SRC}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "smpq.cli", "quantize", "--uniform", "4/4",
                           "--out", str(tmp_path / "o")], env=env, capture_output=True,
                          text=True, timeout=300)


def test_ctrl_c_while_torch_loads_is_one_line_and_exit_130(tmp_path):
    res = _start_interrupted(tmp_path, textwrap.dedent("""
        import os, signal, sys
        class Finder:  # SIGINT at the moment `import torch` starts
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    os.kill(os.getpid(), signal.SIGINT)
                return None
        sys.meta_path.insert(0, Finder())
    """))
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip().splitlines() == [
        "interrupted while starting; nothing was written"], res.stderr
    assert not (tmp_path / "o").exists()


def test_ctrl_c_after_start_up_in_a_command_without_resume_is_one_line_and_130(
        monkeypatch, capsys, tmp_path):
    import smpq.cli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(smpq.cli, "fp_model", interrupt)
    code, _, err = cli(monkeypatch, capsys, "quantize", "--uniform", "4/4", "--out",
                       tmp_path / "o")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["interrupted; no output folder was replaced"]
    assert list(tmp_path.iterdir()) == []
