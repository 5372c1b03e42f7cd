"""Property: malformed policy files and budget strings end in one `error:` line, exit 2.

Each generator builds inputs that are wrong by construction (never by asking smpq), feeds them
to the `smpq` entry point on a tiny checkpoint, and checks: exit code 2, nothing on stdout (no
table before the error), exactly one stderr line starting `error:`, no traceback, and no file
written (no output folder, no model cache).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smpq.cli import main
from smpq.cnn.models import build_model
from smpq.cnn.train import save_checkpoint
from smpq.cost import METRICS
from smpq.spec import MAX_BITS, MIN_BITS

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, build_model("mlp", (1, 8, 8), 10, seed=0), {"dataset": "digits"})
    return d


@pytest.fixture(scope="module")
def names(ckpt):
    import torch

    from smpq.cnn.train import load_checkpoint
    from smpq.cost import trace_costs

    net, _ = load_checkpoint(ckpt)
    return trace_costs(net, torch.zeros(1, 1, 8, 8)).names


def _run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["smpq", *args]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, out.getvalue(), err.getvalue()


def _assert_one_line_error(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err


# -- malformed budgets -----------------------------------------------------------------------

# Text that rich or a line count could trip over: markup tags, emoji codes, line breaks.
_TRAPS = ["a", "b.c", "[/x]", "[bold]", "[", "]", ":smile:", "\n", "\r\n", "\u2028", "\x85",
          "\\", '"', " ", "\t", "é"]
_tricky = st.one_of(st.lists(st.sampled_from(_TRAPS), min_size=1, max_size=6).map("".join),
                    st.text(min_size=1))
_bits_out = st.one_of(st.integers(-50, MIN_BITS - 1), st.integers(MAX_BITS + 1, 10**6))
_valid_pair = st.tuples(st.integers(MIN_BITS, MAX_BITS), st.integers(MIN_BITS, MAX_BITS))
_metric = st.sampled_from(METRICS)
_valid_item = st.one_of(
    st.builds(lambda m, p: f"{m}=uniform:{p[0]}/{p[1]}", _metric, _valid_pair),
    st.builds(lambda m, v: f"{m}={v}", st.sampled_from(["bitops", "avg_bits", "eff_bits"]),
              st.integers(1, 10**9)),
)
_bad_item = st.one_of(
    st.builds(lambda n, v: f"{n}={v}",  # unknown metric
              _tricky.filter(lambda n: n.strip() not in METRICS and not set(n) & set("=,")),
              st.integers(1, 100)),
    st.builds(lambda m, v: f"{m}{v}", _metric, st.integers(1, 100)),  # no '='
    st.builds(lambda m, ws: f"{m}={ws}", _metric, st.text(" \t", max_size=3)),  # nothing after
    st.builds(lambda m, v: f"{m}={v}", _metric,  # not positive, or not finite
              st.sampled_from(["0", "-1", "-0.5", "0.0", "1e999", "-1e999", "1e-999"])),
    st.builds(lambda m, v: f"{m}={v}", _metric,  # letters only: never a number
              st.text("abcdefghijklmnopqrstuvwxyzE", min_size=1)),
    st.builds(lambda u: f"size=3{u}", st.text("xyzqwrt", min_size=1)),  # unknown size unit
    st.builds(lambda m, u: f"{m}=3{u}", st.sampled_from(["bitops", "avg_bits", "eff_bits"]),
              st.sampled_from(["kb", "MB", "bits", "x"])),  # a unit where none belongs
    st.builds(lambda m, w, a: f"{m}=uniform:{w}/{a}", _metric, _bits_out,
              st.integers(MIN_BITS, MAX_BITS)),
    st.builds(lambda m, b: f"{m}=uniform:{b}", _metric, st.integers(MIN_BITS, MAX_BITS)),
    st.builds(lambda m, r, p: f"{m}={r}*uniform:{p[0]}/{p[1]}", _metric,
              st.sampled_from(["0", "-2", "1e999", "x", "..", "--1"]), _valid_pair),
)


@st.composite
def bad_budgets(draw) -> str:
    kind = draw(st.sampled_from(["separators", "bad_item", "duplicate"]))
    if kind == "separators":  # nothing but commas and spaces, e.g. `--budget ,`
        return draw(st.text(", \t", min_size=1))
    if kind == "duplicate":
        m = draw(_metric)
        return f"{m}=uniform:4/4,{m}=uniform:3/3"
    items = draw(st.lists(_valid_item, max_size=2))
    items.insert(draw(st.integers(0, len(items))), draw(_bad_item))
    return ",".join(items)


@SETTINGS
@given(budget=bad_budgets())
def test_cost_with_a_malformed_budget_prints_one_error_line_only(ckpt, budget):
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        res = _run("cost", "--checkpoint", str(ckpt), "--cache", str(cache), "--uniform", "4/4",
                   "--budget", budget)
        _assert_one_line_error(*res)
        assert not cache.exists()


def test_cost_budget_of_a_lone_comma_fails_before_the_table(ckpt):
    code, out, err = _run("cost", "--checkpoint", str(ckpt), "--uniform", "4/4", "--budget", ",")
    assert code == 2 and out == "" and err.startswith("error:") and "empty budget" in err


# -- malformed policy files ------------------------------------------------------------------

_bad_shorthand = st.one_of(
    _tricky.filter(lambda s: "/" not in s),
    st.builds(lambda w, a: f"{w}/{a}", _bits_out, st.integers(MIN_BITS, MAX_BITS)),
    st.builds(lambda w, a: f"{w}/{a}", st.integers(MIN_BITS, MAX_BITS), _bits_out),
    st.builds(lambda p, q: f"{p[0]}/{p[1]}/{q}", _valid_pair, st.integers(1, 8)),
)
_bad_choice = st.one_of(
    _bad_shorthand,
    st.integers(), st.floats(allow_nan=True), st.booleans(),
    st.lists(st.integers(1, 8), max_size=3),
    st.builds(lambda b: {"weight": {"bits": b}, "act": None}, _bits_out),
    st.builds(lambda k: {"weight": None, "act": None, k: 1},
              st.text(min_size=1).filter(lambda k: k not in ("weight", "act"))),
    st.builds(lambda k: {"weight": {"bits": 4, k: 1}, "act": None},
              st.text(min_size=1).filter(lambda k: k not in (
                  "bits", "fmt", "symmetric", "granularity", "group_size", "scale_bits",
                  "version"))),
)
_non_object = st.one_of(st.none(), st.booleans(), st.integers(), st.text(),
                        st.lists(st.integers(), max_size=3))


def _dumps(d) -> str:
    return json.dumps(d, allow_nan=True)


@st.composite
def bad_policy_files(draw, names: list[str]) -> bytes:
    """Bytes of a policy file that is wrong for a model with layers `names`."""
    good = {n: "4/4" for n in names}
    kind = draw(st.sampled_from([
        "truncated", "not_utf8", "duplicate", "deep", "top_level", "bad_choice", "unknown_layer",
        "missing_layer", "unknown_field", "version", "layers_type", "meta_type"]))
    if kind == "truncated":  # every strict prefix of compact JSON without trailing space
        text = json.dumps({"version": 1, "layers": good}, separators=(",", ":"))
        return text[:draw(st.integers(0, len(text) - 1))].encode()
    if kind == "not_utf8":
        return b"\xff" + draw(st.binary(max_size=20))
    if kind == "duplicate":
        dup = draw(st.sampled_from(names))
        body = ", ".join(f"{json.dumps(n)}: \"4/4\"" for n in [*names, dup])
        return ('{"layers": {' + body + "}}").encode()
    if kind == "deep":
        depth = draw(st.integers(65, 3000))
        opens, closes = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = "" if opens == "[" else "1"
        nested = opens * depth + inner + closes * depth
        return f'{{"layers": {_dumps(good)}, "meta": {{"x": {nested}}}}}'.encode()
    if kind == "top_level":
        return _dumps(draw(_non_object)).encode()
    if kind == "bad_choice":
        layer = draw(st.sampled_from(names))
        return _dumps({"layers": {**good, layer: draw(_bad_choice)}}).encode()
    if kind == "unknown_layer":
        ghost = draw(_tricky.filter(lambda n: n not in names))
        return _dumps({"layers": {**good, ghost: "4/4"}}).encode()
    if kind == "missing_layer":
        keep = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1))
        return _dumps({"layers": {n: "4/4" for n in keep}}).encode()
    if kind == "unknown_field":
        field = draw(st.text(min_size=1).filter(lambda k: k not in ("version", "layers", "meta")))
        return _dumps({"layers": good, field: draw(_non_object)}).encode()
    if kind == "version":
        version = draw(st.one_of(st.integers().filter(lambda v: v != 1), st.text(),
                                 st.lists(st.integers(), max_size=2)))
        return _dumps({"version": version, "layers": good}).encode()
    if kind == "layers_type":
        return _dumps({"layers": draw(_non_object)}).encode()
    meta = draw(st.one_of(st.sampled_from([0, 0.0, "", [], False]),  # falsy, still not objects
                          _non_object.filter(lambda m: m is not None)))
    return _dumps({"layers": good, "meta": meta}).encode()


@SETTINGS
@given(data=st.data())
def test_quantize_with_a_malformed_policy_prints_one_error_line_and_writes_nothing(
        ckpt, names, data):
    payload = data.draw(bad_policy_files(names), label="policy file")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "policy.json").write_bytes(payload)
        res = _run("quantize", "--checkpoint", str(ckpt), "--cache", str(tmp / "cache"),
                   "--policy", str(tmp / "policy.json"), "--out", str(tmp / "out"))
        _assert_one_line_error(*res)
        assert sorted(p.name for p in tmp.iterdir()) == ["policy.json"]


# -- hostile --out targets -------------------------------------------------------------------

_OUT_KINDS = ["users_folder", "link_to_users_folder", "link_to_new_folder", "link_loop",
              "self_loop", "empty", "blank", "file", "link_to_file", "dangling_link",
              "nested_new", "under_a_file"]


def _plant_out(root: Path, kind: str, names: list[str]) -> str:
    """Build the hostile --out target `kind` under `root` (with the user's files `names`)."""
    mine = root / "mine"
    mine.mkdir()
    for i, n in enumerate(names):
        (mine / n).parent.mkdir(parents=True, exist_ok=True)
        (mine / n).write_bytes(f"{n}:{i}".encode())
    (root / "f.txt").write_text("a file of the user's")
    if kind == "users_folder":
        return str(mine)
    if kind in ("link_to_users_folder", "link_to_new_folder", "link_to_file", "dangling_link"):
        target = {"link_to_users_folder": mine, "link_to_new_folder": root / "fresh",
                  "link_to_file": root / "f.txt", "dangling_link": root / "nowhere" / "x"}[kind]
        if kind == "link_to_new_folder":
            target.mkdir()
        (root / "link").symlink_to(target)
        return str(root / "link")
    if kind == "link_loop":
        (root / "a").symlink_to(root / "b")
        (root / "b").symlink_to(root / "a")
        return str(root / "a")
    if kind == "self_loop":
        (root / "s").symlink_to(root / "s")
        return str(root / "s" / "out")
    if kind in ("empty", "blank"):
        return "" if kind == "empty" else " "
    if kind == "file":
        return str(root / "f.txt")
    if kind == "under_a_file":
        return str(root / "f.txt" / "out")
    return str(root / "new" / "deeper" / "out")


def _snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root`: file bytes, symlink targets, folders (not followed)."""
    import os

    got: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            got[rel] = (("link", os.readlink(p)) if p.is_symlink() else
                        ("dir",) if p.is_dir() else ("file", p.read_bytes()))
    return got


_user_names = st.lists(st.sampled_from(["policy.json", "metrics.json", "model/thesis.tex",
                                        "model/model.safetensors", "notes.txt", ".hidden",
                                        "engine_state.json", "checkpoint/state.json"]),
                       min_size=1, max_size=4, unique=True)


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(_OUT_KINDS), names=_user_names)
def test_hostile_out_targets_lose_nothing_and_fail_in_one_line(ckpt, kind, names):
    """Property: exit 0 or 2, at most one `error:` line, no traceback; every file, folder and
    symlink of the user's is as it was (byte for byte), and a failure leaves no new folder."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        out = _plant_out(root, kind, names)
        before = _snapshot(root)
        cwd = os.getcwd()
        os.chdir(root)  # `--out ''` would write here
        try:
            code, stdout, err = _run("quantize", "--uniform", "8/8", "--checkpoint", str(ckpt),
                                     "--out", out)
        finally:
            os.chdir(cwd)
        assert "Traceback" not in stdout + err, err
        assert code in (0, 2), (code, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert (code == 2) == bool(lines) and len(lines) <= 1, err
        assert not lines or lines[0].startswith("error:"), err
        after = _snapshot(root)
        for rel, what in before.items():  # nothing of the user's deleted or changed
            if code == 0 and kind == "link_to_new_folder" and rel.startswith("fresh/"):
                continue
            assert after.get(rel) == what, (kind, rel)
        new = set(after) - set(before)
        if code == 2:
            assert new == set(), (kind, new)
        else:  # written where asked: a new folder, or through the link into its target
            assert kind in ("link_to_new_folder", "dangling_link", "nested_new"), kind
            assert all(not isinstance(after[n], tuple) or after[n][0] != "dir" or
                       any(k.startswith(n + "/") for k in after) for n in new), new


# -- hostile Hugging Face folders (issue 20) -------------------------------------------------

def _hostile_hf_folder(folder: Path, fault: str, value: int) -> None:
    """A tiny random Llama saved to `folder`, then damaged: a broken safetensors header, a
    config whose shapes do not match the weights, or one asking for a huge model."""
    import struct

    import torch
    import transformers

    from smpq.transformer.tiny_lm import ByteTokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    ByteTokenizer().save(folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if fault == "header_length":  # from just past the file to 2**64-1
        weights.write_bytes(struct.pack("<Q", len(raw) + value % (2**64 - len(raw))) + raw[8:])
    elif fault == "header_bytes":  # the header's JSON overwritten by junk bytes
        junk = bytes((value >> (8 * (i % 8))) & 0xFF or 0x21 for i in range(n))
        weights.write_bytes(raw[:8] + junk[:1].replace(b"{", b"!") + junk[1:] + raw[8 + n:])
    elif fault == "truncated":
        weights.write_bytes(raw[: 8 + value % (len(raw) - 8)])
    else:  # a config field changed: hidden_size, intermediate_size or vocab_size
        c = json.loads(config.read_text())
        size = c[fault] + 1 + value % 10**12  # never the stored size
        c[fault] = size
        config.write_text(json.dumps(c))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(fault=st.sampled_from(["header_length", "header_bytes", "truncated", "hidden_size",
                              "intermediate_size", "vocab_size"]),
       value=st.integers(0, 2**63))
def test_ptq_on_a_hostile_hugging_face_folder_is_one_line_and_fast(fault, value):
    import time

    pytest.importorskip("transformers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _hostile_hf_folder(tmp / "model", fault, value)
        start = time.perf_counter()
        res = _run("ptq", "--model", str(tmp / "model"), "--out", str(tmp / "out"),
                   "--cache", str(tmp / "cache"))
        seconds = time.perf_counter() - start
        _assert_one_line_error(*res)
        assert seconds < 20, seconds  # refused before any weight is loaded
        assert not (tmp / "out").exists() and not (tmp / "cache").exists()
