"""Local Hugging Face folders a user brings: refused up front, with one line, when unusable.

Folders are tiny random models saved to tmp paths here: nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from smpq.cli import main  # noqa: E402
from smpq.errors import SmpqError  # noqa: E402
from smpq.transformer import ByteTokenizer, load_local  # noqa: E402


def _tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _save(folder, model) -> None:
    model.save_pretrained(str(folder))
    ByteTokenizer().save(folder)


def _pickle_only(folder):
    """A folder as older tools write it: config.json and pytorch_model.bin, no safetensors."""
    model = _tiny_llama()
    _save(folder, model)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the folder printed
    monkeypatch.setattr(sys, "argv", ["smpq", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_pickle_only_folder_is_refused_asking_for_safetensors(tmp_path, monkeypatch, capsys):
    folder = _pickle_only(tmp_path / "bin")
    with pytest.raises(SmpqError, match="pytorch_model.bin.*safetensors"):
        load_local(folder)
    code, err = _cli(monkeypatch, capsys, "ptq", "--model", folder, "--out", tmp_path / "out")
    assert code == 2 and err.startswith("error:") and "safetensors" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_named_when_loading(tmp_path, bad):
    model = _tiny_llama()
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_parameter(name)[3, 5] = bad
    _save(tmp_path, model)
    with pytest.raises(SmpqError, match=f"non-finite.*{name}") as exc:
        load_local(tmp_path)
    assert "\n" not in str(exc.value)


def test_finite_safetensors_folder_still_loads(tmp_path):
    _save(tmp_path, _tiny_llama())
    model, tok = load_local(tmp_path)
    ref = _tiny_llama()
    for (n, p), (m, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)
    assert isinstance(tok, ByteTokenizer)
