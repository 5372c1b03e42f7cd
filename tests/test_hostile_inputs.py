"""Hostile inputs (issue 20): each is one `error:` line, exit 2, no traceback, before any
expensive work, and no output folder left behind; and a peer tool never touches the user's
cache. Models are tiny random ones saved to tmp paths; nothing is downloaded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import sys
import time
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from smpq.cli import main
from smpq.errors import SmpqError
from smpq.policy import Policy

FAST = 20.0  # seconds: every refusal here comes before any model is trained or loaded


def _run(*args) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with mock.patch.object(sys, "argv", ["smpq", *map(str, args)]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def _one_line(code: int, out: str, err: str, seconds: float, *needles: str) -> str:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert seconds < FAST, seconds
    return lines[0]


# -- arguments: --seed, --evaluations, --device, --workers ----------------------------------

SEED_COMMANDS = ["train", "quantize", "search", "compare", "run", "ptq"]


@pytest.mark.parametrize("command", SEED_COMMANDS)
@pytest.mark.parametrize("seed", [-1, 2**64, 10**30])
def test_seed_out_of_range_is_one_line_in_every_command(tmp_path, command, seed):
    out = tmp_path / "out"
    r = _run(command, "--seed", seed, "--out", out)
    _one_line(*r, "--seed", str(seed))
    assert not out.exists()


def test_largest_seed_is_accepted_at_argument_checking(tmp_path):
    from smpq.cli import MAX_SEED, _check_seed

    assert _check_seed(MAX_SEED) == 2**64 - 1 and _check_seed(0) == 0


@pytest.mark.parametrize("command", ["search", "ptq"])
@pytest.mark.parametrize("n", [10**12, 10**6 + 1])
def test_evaluations_past_the_bound_is_one_line(tmp_path, command, n):
    out = tmp_path / "out"
    _one_line(*_run(command, "--evaluations", n, "--out", out), "--evaluations", "1,000,000")
    assert not out.exists()


def test_engine_config_refuses_an_unbounded_evaluation_budget():
    from smpq.engine.loop import EngineConfig
    from smpq.strategy import MAX_EVALUATIONS

    EngineConfig(evaluations=MAX_EVALUATIONS)
    with pytest.raises(SmpqError, match="evaluations"):
        EngineConfig(evaluations=10**12)


@pytest.mark.parametrize("command", ["search", "compare"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_device_without_cuda_is_one_line(tmp_path, command, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / "out"
    _one_line(*_run(command, "--device", device, "--out", out), "no CUDA device")
    assert not out.exists()


def test_cuda_index_past_the_devices_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _one_line(*_run("search", "--device", "cuda:2", "--out", tmp_path / "o"), "cuda:0..cuda:1")
    _one_line(*_run("search", "--device", "gpu", "--out", tmp_path / "o"), "cpu, cuda or cuda:K")


@pytest.mark.parametrize("command", ["search", "compare"])
def test_more_workers_than_cpus_is_one_line_before_ray_starts(tmp_path, command, monkeypatch):
    started = []
    fake_ray = types.ModuleType("ray")
    fake_ray.init = lambda *a, **k: started.append(1)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    out = tmp_path / "out"
    cpus = os.cpu_count() or 1
    line = _one_line(*_run(command, "--workers", 100000, "--out", out), "--workers 100000")
    assert f"at most {cpus}" in line and not started and not out.exists()


def test_workers_beyond_a_clusters_cpus_are_refused_after_joining(monkeypatch):
    from smpq.evaluator import raypool

    calls = []
    fake = types.SimpleNamespace(
        is_initialized=lambda: False, init=lambda **k: calls.append("init"),
        cluster_resources=lambda: {"CPU": 4.0}, shutdown=lambda: calls.append("shutdown"))
    monkeypatch.setattr(raypool, "_ray", lambda: fake)
    monkeypatch.setattr(raypool, "check_address", lambda a: None)
    with pytest.raises(SmpqError, match="more than the 4 CPUs of the Ray cluster at h:1"):
        raypool._RayPool(object(), 5, ["cpu"], "h:1")  # type: ignore[arg-type]
    assert calls == ["init", "shutdown"]  # disconnected, no actor started


# -- JSON: policies, calibration lines, resume states ---------------------------------------

def test_policy_with_a_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "p.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"version": 1, "layers": {"fc": "4/8"}}).encode())
    pol = Policy.load(p)
    assert pol.bits_table() == {"fc": (4, 8)}


@pytest.mark.parametrize("version", [True, False, 1.5, "1"])
def test_policy_version_must_be_the_integer_1(tmp_path, version):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"version": version, "layers": {}}))
    with pytest.raises(SmpqError, match="unsupported policy version"):
        Policy.load(p)


DEEP = "[" * 200_000 + "]" * 200_000


def test_calibration_jsonl_line_nested_200000_deep_is_one_line(tmp_path):
    from smpq.transformer.wiki import read_text_documents

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "fine"}\n' + DEEP + "\n")
    with pytest.raises(SmpqError, match=r"c\.jsonl:2: .*nested more than 64 levels") as exc:
        read_text_documents(p)
    assert "\n" not in str(exc.value)


def test_calibration_jsonl_line_deep_via_cli(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(DEEP + "\n")
    out = tmp_path / "out"
    _one_line(*_run("ptq", "--calib-text", p, "--out", out), "nested more than")


def test_engine_state_nested_200000_deep_is_one_line(tmp_path):
    from conftest import bitops_ladder_space
    from smpq.engine.loop import EngineConfig, run_engine

    space = bitops_ladder_space(4, 3, seed=0, frac=0.5)
    state = tmp_path / "engine_state.json"
    state.write_text(DEEP)
    with pytest.raises(SmpqError, match="nested more than 64 levels"):
        run_engine(space, lambda rows: rows.sum(1).astype(float), EngineConfig(evaluations=20),
                   checkpoint=state, resume=True)


def test_a_resume_state_that_is_not_an_object_is_one_line(tmp_path):
    from conftest import bitops_ladder_space
    from smpq.engine.loop import EngineConfig, run_engine

    space = bitops_ladder_space(4, 3, seed=0, frac=0.5)
    state = tmp_path / "engine_state.json"
    state.write_text("[]")
    with pytest.raises(SmpqError, match="cannot resume"):
        run_engine(space, lambda rows: rows.sum(1).astype(float), EngineConfig(evaluations=20),
                   checkpoint=state, resume=True)


# -- Hugging Face folders -------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=1)


def _variant(src: Path, dst: Path, config=None, raw=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if raw is not None:
        p = dst / "model.safetensors"
        p.write_bytes(raw(p.read_bytes()))
    return dst


def _header_len(b: bytes) -> int:
    return struct.unpack("<Q", b[:8])[0]


BAD_HEADERS = {
    "length 2**40": lambda b: struct.pack("<Q", 2**40) + b[8:],
    "length past the file": lambda b: struct.pack("<Q", len(b)) + b[8:],
    "not JSON": lambda b: b[:8] + b"!" * _header_len(b) + b[8 + _header_len(b):],
    "cut short": lambda b: b[: len(b) // 2],
}


@pytest.mark.parametrize("fault", list(BAD_HEADERS))
def test_hf_folder_with_a_broken_safetensors_header_is_one_line(llama_folder, tmp_path, fault):
    folder = _variant(llama_folder, tmp_path / "m", raw=BAD_HEADERS[fault])
    out = tmp_path / "out"
    _one_line(*_run("ptq", "--model", folder, "--out", out), "cannot read model weights")
    assert not out.exists()


@pytest.mark.parametrize("config, tensor", [
    ({"hidden_size": 64}, "lm_head.weight"),
    ({"intermediate_size": 48}, "model.layers.0.mlp.down_proj.weight"),
    ({"vocab_size": 10**12}, "lm_head.weight"),
    ({"hidden_size": 10**6}, "lm_head.weight"),
])
def test_hf_folder_whose_config_does_not_match_its_weights_is_one_line(
        llama_folder, tmp_path, config, tensor):
    folder = _variant(llama_folder, tmp_path / "m", config=config)
    out = tmp_path / "out"
    line = _one_line(*_run("ptq", "--model", folder, "--out", out), repr(tensor),
                     "config.json gives")
    assert "RuntimeError" not in line and not out.exists()


def test_hf_folder_config_asking_far_more_than_its_weights_hold_is_refused(
        llama_folder, tmp_path):
    from smpq.transformer import load_local

    folder = _variant(llama_folder, tmp_path / "m", config={"num_hidden_layers": 40})
    with pytest.raises(SmpqError, match="values the weights do not hold"):
        load_local(folder)


def test_hf_folder_that_matches_its_config_still_loads(llama_folder):
    from smpq.transformer import load_local

    model, _ = load_local(llama_folder)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(llama_folder))
    for (n, p), (m, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)


def test_broken_cnn_checkpoint_header_uses_the_same_checker(tmp_path):
    from smpq.cnn.models import build_model
    from smpq.cnn.train import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, build_model("mlp", (1, 8, 8), 10, seed=0), {"dataset": "digits"})
    p = tmp_path / "model.safetensors"
    p.write_bytes(BAD_HEADERS["length 2**40"](p.read_bytes()))
    with pytest.raises(SmpqError, match="cannot read checkpoint weights .*header too large"):
        load_checkpoint(tmp_path)


# -- the AutoScheme peer: a private cache ---------------------------------------------------

def test_autoscheme_never_touches_the_users_auto_round_cache(tmp_path, monkeypatch):
    """auto-round is faked: it records HOME and writes its score cache under ~/.cache."""
    from smpq.transformer import peers
    from smpq.transformer.scores import parse_candidates

    home = tmp_path / "home"
    mine = home / ".cache" / "auto_round" / "keep.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("the user's")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    seen = {}

    class AutoRound:
        def __init__(self, model, tokenizer, **kw):
            self.layer_config = {"fc": {"bits": 4}}
            self.scheme_generator = types.SimpleNamespace(
                auto_scheme=types.SimpleNamespace(avg_bits=0),
                get_layer_config=lambda: {"fc": {"bits": 2}})

        def post_init(self):
            seen["home"] = str(Path.home())
            seen["xdg"] = os.environ.get("XDG_CACHE_HOME")
            cache = Path.home() / ".cache" / "auto_round"
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "scores.bin").write_text("peer")

    fake = types.ModuleType("auto_round")
    fake.AutoRound, fake.AutoScheme = AutoRound, lambda **kw: None  # type: ignore[attr-defined]
    schemes = types.ModuleType("auto_round.schemes")
    schemes.QuantizationScheme = lambda **kw: kw  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "auto_round", fake)
    monkeypatch.setitem(sys.modules, "auto_round.schemes", schemes)
    session = types.SimpleNamespace(
        kind="causal_lm", specs=parse_candidates("int2g32,int4g32"),
        calib=torch.zeros(2, 8, dtype=torch.long), swapper=None,
        tokenizer=types.SimpleNamespace(decode=lambda ids: "x" * len(ids)),
        model=torch.nn.Linear(2, 2), linears={"fc": None})
    out, _ = peers.autoscheme_allocation(session, [4.0, 2.0])
    assert set(out) == {4.0, 2.0}
    assert mine.read_text() == "the user's"  # kept, unchanged
    assert sorted(p.name for p in mine.parent.iterdir()) == ["keep.txt"]  # nothing added
    assert seen["home"] != str(home) and not seen["home"].startswith(str(home))
    assert seen["xdg"] and seen["xdg"].startswith(seen["home"])
    assert os.environ["HOME"] == str(home) and "XDG_CACHE_HOME" not in os.environ  # restored
    assert not Path(seen["home"]).exists()  # the private cache went with the call
