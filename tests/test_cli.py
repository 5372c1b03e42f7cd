"""The command line: results on a tiny checkpoint, and one-line errors with exit code 2."""

import json
import re
import sys

import pytest
from torch import nn

from smpq.cli import main
from smpq.cnn.models import build_model
from smpq.cnn.train import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    save_checkpoint(d, model, {"dataset": "digits"})
    return d


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["smpq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cost_table(monkeypatch, capsys, ckpt):
    code, out, _ = run(monkeypatch, capsys, "cost", "--checkpoint", ckpt, "--uniform", "4/4",
                       "--budget", "bitops=uniform:4/4")
    assert code == 0
    # Reference from the model itself: one token through each Linear, first and last pinned 8/8.
    linears = [(n, m) for n, m in build_model("mlp", (1, 8, 8), 10, seed=0).named_modules()
               if isinstance(m, nn.Linear)]
    want = {}
    for i, (name, lin) in enumerate(linears):
        bits = 8 if i in (0, len(linears) - 1) else 4
        want[name] = (bits, lin.in_features * lin.out_features * bits * bits)
    rows = {cells[0]: cells for line in out.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 8}
    assert set(rows) - {"layer"} == set(want)
    for name, (bits, bitops) in want.items():
        assert rows[name][4:6] == [str(bits), str(bits)]
        assert float(rows[name][7]) == pytest.approx(bitops, rel=1e-3)
    total = float(re.search(r"bitops: ([\d.]+) MBitOps", out).group(1))
    assert total == pytest.approx(sum(b for _, b in want.values()) / 1e6, rel=1e-3)
    assert re.search(r"│ bitops=uniform:4/4 .*│\s+yes │", out)


def test_quantize_writes_outputs(monkeypatch, capsys, ckpt, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "quantize", "--checkpoint", ckpt, "--uniform", "8/8",
                       "--out", tmp_path / "q")
    assert code == 0
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert 0 <= metrics["test_acc"] <= 1 and metrics["avg_bits"] == pytest.approx(8)
    assert (tmp_path / "q" / "policy.json").is_file()


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "args, msg",
    [
        (["quantize", "--policy", "MISSING"], "not found"),
        (["quantize", "--policy", "BAD_JSON"], "not valid JSON"),
        (["quantize", "--policy", "UNKNOWN_LAYER"], "unknown layer"),
        (["quantize", "--uniform", "9/4"], "bits"),
        (["quantize", "--uniform", "4/4", "--policy", "BAD_JSON"], "exactly one"),
        (["cost", "--uniform", "2/2", "--budget", "bitops=0.5*uniform:2/2"], None),
        (["cost", "--uniform", "4/4", "--budget", "flops=3"], "unknown budget metric"),
        (["layers", "--checkpoint", "NOWHERE"], "not found"),
        (["compare", "--methods", "uniform,bogus"], "unknown method"),
        (["search", "--budget", "bitops=0.1*uniform:2/2", "--epochs", "1"], "cheapest reachable"),
        (["search", "--w-bits", "2,x"], "candidate bits"),
        (["search", "--method", "bogus"], "unknown method"),
        (["search", "--top-k", "0"], "top-k"),
        (["search", "--evaluations", "3"], "evaluation budget of 3"),
        (["ptq", "--model", "NOWHERE"], "not found"),
        (["ptq", "--candidates", "int9g32", "--model", "NOWHERE"], "bits"),
        (["ptq", "--backend", "bogus", "--model", "NOWHERE"], "unknown PTQ backend"),
    ],
)
def test_user_mistakes_exit_2(monkeypatch, capsys, ckpt, tmp_path, args, msg):
    files = {
        "MISSING": tmp_path / "missing.json",
        "BAD_JSON": _write(tmp_path, "bad.json", "{oops"),
        "UNKNOWN_LAYER": _write(tmp_path, "u.json", json.dumps({"layers": {"ghost": "4/4"}})),
        "NOWHERE": tmp_path / "nowhere",
    }
    args = [str(files.get(a, a)) for a in args]
    if "--checkpoint" not in args and args[0] != "ptq":
        args += ["--checkpoint", str(ckpt)]
    code, out, err = run(monkeypatch, capsys, *args)
    if msg is None:  # a budget over a policy is reported, not an error: 'NO' marks the violation
        assert code == 0 and "NO" in out
        return
    assert code == 2
    assert "Traceback" not in err and "error:" in err and msg in err
    assert len(err.strip().splitlines()) == 1


def test_nan_checkpoint(monkeypatch, capsys, tmp_path):
    import torch

    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    from safetensors.torch import save_file

    save_checkpoint(tmp_path, build_model("mlp", (1, 8, 8), 10, seed=0), {"dataset": "digits"})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    code, _, err = run(monkeypatch, capsys, "cost", "--checkpoint", tmp_path, "--uniform", "4/4")
    assert code == 2 and "non-finite" in err
