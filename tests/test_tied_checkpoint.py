"""A tied token embedding / float lm_head is stored once in the packed checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from smpq.export import load_quantized, save_quantized  # noqa: E402
from smpq.export.safetensors_io import META_FILE, WEIGHTS_FILE  # noqa: E402
from smpq.policy import LayerChoice, Policy  # noqa: E402
from smpq.primitives import fake_quantize  # noqa: E402
from smpq.spec import QuantSpec  # noqa: E402

VOCAB, HIDDEN = 96, 32
INT4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)


def tied_llama(seed: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def policy_for(model: torch.nn.Module) -> Policy:
    """Every decoder projection int4 g16; lm_head (tied) stays float."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    return Policy({n: LayerChoice(INT4, None) for n in names} | {"lm_head": None})


def _keys(path) -> set[str]:
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        return set(f.keys())


def test_tied_embedding_stored_once_and_loaded_into_both(tmp_path):
    model = tied_llama(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    policy = policy_for(model)
    save_quantized(tmp_path / "tied", model, policy)
    keys = _keys(tmp_path / "tied")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    meta = json.loads((tmp_path / "tied" / META_FILE).read_text())
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}

    untied = copy.deepcopy(model)  # same values, two parameters: stored twice
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    save_quantized(tmp_path / "untied", untied, policy)
    assert "lm_head.weight" in _keys(tmp_path / "untied")
    saved = ((tmp_path / "untied" / WEIGHTS_FILE).stat().st_size
             - (tmp_path / "tied" / WEIGHTS_FILE).stat().st_size)
    emb_bytes = VOCAB * HIDDEN * 4
    assert emb_bytes <= saved <= emb_bytes + 200  # one float32 embedding, plus its header entry

    # reference: the float model with each quantized weight fake-quantized (primitives)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, c in policy.layers.items():
            if c is not None:
                w = ref.get_submodule(name).weight
                w.copy_(fake_quantize(w, c.weight))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    fresh = tied_llama(1)  # other random weights, tied
    loaded = load_quantized(tmp_path / "tied", fresh)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
        assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_files_without_tied_entry_still_load(tmp_path):
    model = tied_llama(0)
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    save_quantized(tmp_path, untied, policy_for(model))
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta.pop("tied") == {}
    (tmp_path / META_FILE).write_text(json.dumps(meta))  # as written before ties were kept
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_quantized(tmp_path, tied_llama(2))(ids).logits
        b = load_quantized(tmp_path, copy.deepcopy(untied))(ids).logits
    assert torch.equal(a, b)
