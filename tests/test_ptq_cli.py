"""`smpq ptq`: data wiring (text sources, --calib-text/--calib-tokens), engine flags and bad
input refused with one line (exit 2) before any expensive step. Tiny random Llama folders."""

from __future__ import annotations

import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402
from smpq.cli import main  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.transformer import run as run_mod  # noqa: E402
from smpq.transformer import session as session_mod  # noqa: E402
from smpq.transformer.run import RunSettings  # noqa: E402
from smpq.transformer.session import _lm_blocks  # noqa: E402
from smpq.transformer.tiny_lm import ByteTokenizer  # noqa: E402

CANDS = "int2g32,int4g32,int8g32"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=1, max_positions=256)


def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["smpq", "ptq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _never(*args, **kwargs):
    raise AssertionError("an expensive step ran before the input was refused")


def _refused(code: int, err: str, msg: str) -> None:
    assert code == 2, err
    assert err.startswith("error:") and msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_folder_without_config(monkeypatch, capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = _cli(monkeypatch, capsys, "--model", tmp_path / "m", "--out", tmp_path / "o")
    _refused(code, err, "no config.json")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_before_loading(monkeypatch, capsys, tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"model_type": "foonet",
                                               "architectures": ["FooForCausalLM"]}))
    (m / "model.safetensors").write_bytes(b"")
    code, _, err = _cli(monkeypatch, capsys, "--model", m, "--out", tmp_path / "o")
    _refused(code, err, "unsupported architecture 'foonet'")
    assert not (tmp_path / "o").exists()


def test_budget_below_the_cheapest_before_data(monkeypatch, capsys, folder, tmp_path):
    monkeypatch.setattr(session_mod, "_lm_blocks", _never)
    code, _, err = _cli(monkeypatch, capsys, "--model", folder, "--budget", "avg_bits=1",
                        "--candidates", CANDS, "--out", tmp_path / "o")
    _refused(code, err, "infeasible")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, msg", [
    (["--evaluations", "3"], "evaluation budget of 3 is below the 8"),
    (["--evaluations", "4", "--top-k", "1"], "evaluation budget of 4 is below the 5"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--calib-tokens", "100"], "--calib-tokens must be an integer >= one block (128"),
    (["--calib-text", "MISSING"], "calibration text file not found"),
    (["--value", "acc"], "unknown metric 'acc'; known: neg_kl, neg_nll"),
    (["--value-split", "test"], "unknown value split 'test'; known: calib, val"),
])
def test_bad_flags_before_loading(monkeypatch, capsys, folder, tmp_path, args, msg):
    monkeypatch.setattr(session_mod, "_load", _never)
    args = [str(tmp_path / "missing.txt") if a == "MISSING" else a for a in args]
    code, _, err = _cli(monkeypatch, capsys, "--model", folder, "--out", tmp_path / "o", *args)
    _refused(code, err, msg)


def test_calibration_file_with_too_few_tokens(monkeypatch, capsys, folder, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("a short text " * 20)  # 260 bytes = 260 byte tokens
    monkeypatch.setattr(run_mod.PTQSession, "prepare", _never)
    code, _, err = _cli(monkeypatch, capsys, "--model", folder, "--calib-text", text,
                        "--calib-tokens", "512", "--out", tmp_path / "o")
    _refused(code, err, "gives 260 tokens; 512 requested")


def test_engine_run_with_own_calibration_text(monkeypatch, capsys, folder, tmp_path):
    text = tmp_path / "calib.jsonl"
    docs = [{"text": f"document {i}: " + "the quick brown fox jumps. " * 12} for i in range(8)]
    text.write_text("\n".join(json.dumps(d) for d in docs))
    out = tmp_path / "o"
    code, stdout, err = _cli(monkeypatch, capsys, "--model", folder, "--calib-text", text,
                             "--calib-tokens", "256", "--evaluations", "9", "--top-k", "2",
                             "--candidates", CANDS, "--budget", "avg_bits=3.5", "--out", out)
    assert code in (0, None), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "shapley-loop"
    assert summary["data"] == {"text": "stdlib", "calibration": str(text)}
    assert summary["search_cost"]["evaluations"] <= 9
    assert "shapley-loop / rtn" in stdout and "policies evaluated" in stdout
    state = json.loads((out / "engine_state.json").read_text())
    # the engine's evaluations, then the guided phase's new full-fidelity ones
    guided = json.loads((out / "engine_guided.json").read_text())["memo"]
    engine = {",".join(map(str, c)) for c in state["choices"]}
    extra = {k for k in guided if k.startswith("None:") and k[len("None:"):] not in engine}
    assert len(state["choices"]) + len(extra) == summary["search_cost"]["evaluations"]


class _SubwordTok:
    """Not a ByteTokenizer: stands for a subword tokenizer (only its type matters here)."""


def test_text_source_auto(monkeypatch):
    import smpq.transformer.data as data
    import smpq.transformer.wiki as wiki

    calls = []
    monkeypatch.setattr(wiki, "wiki_blocks",
                        lambda tok, split, block, n: calls.append(("wiki", split)) or split)
    monkeypatch.setattr(data, "stdlib_corpus", lambda: {k: k for k in
                                                        ("calibration", "validation", "test")})
    monkeypatch.setattr(data, "token_blocks",
                        lambda texts, tok, block, n: calls.append(("stdlib", texts)) or texts)
    monkeypatch.setattr(wiki, "wiki_source", lambda: "here")
    blocks, info = _lm_blocks(_SubwordTok(), RunSettings())
    assert info == {"text": "wikipedia", "calibration": "wikipedia"} and calls[0][0] == "wiki"
    calls.clear()
    blocks, info = _lm_blocks(ByteTokenizer(), RunSettings())  # byte-level: the stdlib split
    assert info["text"] == "stdlib" and "note" not in info and {c[0] for c in calls} == {"stdlib"}

    def missing():
        raise SmpqError("no gensim")

    monkeypatch.setattr(wiki, "wiki_source", missing)
    blocks, info = _lm_blocks(_SubwordTok(), RunSettings())
    assert info["text"] == "stdlib" and "gensim" in info["note"] and "\n" not in info["note"]
    assert set(blocks) == {"calibration", "validation", "test"}


def test_wikipedia_blocks_when_gensim_is_installed():
    wiki = pytest.importorskip("smpq.transformer.wiki")
    try:
        wiki.wiki_source()
    except SmpqError:
        pytest.skip("gensim's test data is not installed")
    s = RunSettings(block=64, calib_blocks=2, val_blocks=2, test_blocks=2)
    blocks, info = _lm_blocks(ByteTokenizer(), RunSettings(text="wikipedia", block=64,
                                                           calib_blocks=2, val_blocks=2,
                                                           test_blocks=2))
    assert info["text"] == "wikipedia" and blocks["test"].shape == (2, s.block)
