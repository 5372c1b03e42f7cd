"""Exports: bit packing, packed safetensors checkpoints, and other toolkits' formats."""

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from smpq.backends.gptq import gptq_quantize
from smpq.errors import SmpqError
from smpq.export import (
    QuantizedTensor,
    decode_minifloat,
    encode_minifloat,
    gguf_name,
    gptq_dynamic,
    hf_quantization_config,
    llama_cpp_tensor_types,
    load_quantized,
    minifloat_codebook,
    pack,
    packed_length,
    parse_tensor_type_args,
    save_quantized,
    torchao_configs,
    torchao_snippet,
    unpack,
    write_exports,
)
from smpq.export.safetensors_io import FP16_SCALE_RTOL, META_FILE, WEIGHTS_FILE
from smpq.policy import Policy
from smpq.primitives import choose_qparams, fake_quantize, minifloat_values
from smpq.spec import FLOAT_FORMATS, LayerChoice, QuantSpec


def spec(bits=4, fmt="int", sym=True, gran="channel", gs=None) -> QuantSpec:
    return QuantSpec(bits=bits, fmt=fmt, symmetric=sym, granularity=gran, group_size=gs)


def choice(s: QuantSpec | None) -> LayerChoice | None:
    return None if s is None else LayerChoice(weight=s, act=None)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented layout, bit by bit: code k at bits k*b.., LSB-first within bytes."""
    stream = [(c >> i) & 1 for c in codes for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(b << i for i, b in enumerate(stream[j : j + 8])) for j in range(0, len(stream), 8)]


# -- packing --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 3),
    n=st.integers(0, 41),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_round_trips_every_width_and_length(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))
    assert packed[0].tolist() == reference_pack(codes[0].tolist(), bits)


def test_pack_extreme_codes_and_errors():
    for bits in range(1, 9):
        top = torch.full((5,), 2**bits - 1)
        assert torch.equal(unpack(pack(top, bits), bits, 5), top.to(torch.uint8))
    with pytest.raises(SmpqError):
        pack(torch.tensor([4]), 2)
    with pytest.raises(SmpqError):
        pack(torch.tensor([-1]), 3)
    with pytest.raises(SmpqError):
        pack(torch.tensor([1]), 9)
    with pytest.raises(SmpqError):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, 5)  # 5 x 3 bits need 2 bytes


@pytest.mark.parametrize("name", list(FLOAT_FORMATS))
def test_minifloat_codebook_matches_values_and_torch_fp8(name):
    values, codes = minifloat_codebook(name)
    assert torch.equal(values, minifloat_values(FLOAT_FORMATS[name]))
    assert len(set(codes.tolist())) == codes.numel()
    assert torch.equal(decode_minifloat(codes, name).double(), values)
    assert torch.equal(encode_minifloat(values, name), codes)
    torch_dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(name)
    if torch_dtype is not None:
        assert torch.equal(values.to(torch_dtype).view(torch.uint8), codes)
    with pytest.raises(SmpqError):
        encode_minifloat(torch.tensor([values[-1].item() * 1.01]), name)


# -- QuantizedTensor ------------------------------------------------------------------------

SPECS = [
    spec(1),
    spec(2, sym=False, gran="group", gs=8),
    spec(3, gran="channel", sym=False),
    spec(4, gran="group", gs=5),
    spec(5, gran="tensor"),
    spec(8, gran="channel"),
    spec(8, fmt="fp8_e4m3", gran="channel"),
    spec(8, fmt="fp8_e5m2", gran="group", gs=8),
    spec(6, fmt="fp6_e3m2", gran="tensor"),
    spec(4, fmt="fp4_e2m1", gran="group", gs=16),
]


@pytest.mark.parametrize("s", SPECS, ids=lambda s: s.label + ("" if s.symmetric else "a"))
def test_quantized_tensor_reproduces_fake_quantize_exactly(s):
    w = torch.randn(6, 19, generator=torch.Generator().manual_seed(3))
    qt = QuantizedTensor.from_float(w, s)
    assert torch.equal(qt.dequantize(), fake_quantize(w, s))
    again = QuantizedTensor.from_fake(fake_quantize(w, s), s, qt.scale, qt.zero_point)
    assert torch.equal(again.codes, qt.codes)
    wb = w.bfloat16()  # half-precision models: same float32 grid, cast back
    qb = QuantizedTensor.from_fake(fake_quantize(wb, s), s, *choose_qparams(wb, s))
    assert torch.equal(qb.dequantize(torch.bfloat16), fake_quantize(wb, s))


def test_from_fake_recovers_gptq_codes_and_rejects_off_grid_weights():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 32, generator=g), torch.randn(64, 32, generator=g)
    for s in (spec(3, gran="group", gs=8, sym=False), spec(4, gran="channel")):
        res = gptq_quantize(w, x.T @ x / 64, s)
        qt = QuantizedTensor.from_fake(res.weight, s, res.scale, res.zero_point)
        assert torch.equal(qt.dequantize(), res.weight)
    s = spec(4, gran="channel")
    scale = QuantizedTensor.from_float(w, s).scale
    with pytest.raises(SmpqError, match="not on the"):
        QuantizedTensor.from_fake(w, s, scale)  # float weights are not on the grid
    with pytest.raises(SmpqError):
        QuantizedTensor.from_fake(w, s, scale[:3])


# -- safetensors checkpoints ----------------------------------------------------------------


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 17), nn.ReLU(), nn.Linear(17, 8)
    ).eval()


MLP_POLICY = Policy(
    {
        "0": choice(spec(3, sym=False, gran="group", gs=8)),
        "2": choice(spec(8, fmt="fp8_e4m3")),
        "4": choice(spec(2, gran="group", gs=5)),
    }
)


def fake_quantized_copy(model: nn.Module, policy: Policy) -> nn.Module:
    """The reference: RTN fake quantization applied to each weight in place."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, c in policy.layers.items():
            if c is not None and c.weight is not None:
                m = ref.get_submodule(name)
                m.weight.copy_(fake_quantize(m.weight, c.weight))
    return ref


def test_mlp_checkpoint_round_trip_is_exact(tmp_path):
    model, x = tiny_mlp(), torch.randn(5, 24)
    save_quantized(tmp_path, model, MLP_POLICY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "policy.json",
        "quant_meta.json",
    ]
    torch.manual_seed(1)
    fresh = nn.Sequential(
        nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 17), nn.ReLU(), nn.Linear(17, 8)
    )
    loaded = load_quantized(tmp_path, fresh)
    ref = fake_quantized_copy(model, MLP_POLICY)
    assert torch.equal(loaded(x), ref(x))
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["format_version"] == 1
    assert meta["layers"]["0"]["bits"] == 3 and meta["layers"]["0"]["scale_dtype"] == "float32"


def test_fp16_scales_stay_within_documented_tolerance(tmp_path):
    model = tiny_mlp()
    save_quantized(tmp_path, model, MLP_POLICY, scale_dtype="float16")
    loaded = load_quantized(tmp_path, tiny_mlp())
    ref = fake_quantized_copy(model, MLP_POLICY)
    for name in MLP_POLICY.layers:
        got, want = loaded.get_submodule(name).weight, ref.get_submodule(name).weight
        assert torch.allclose(got, want, rtol=FP16_SCALE_RTOL, atol=0)
        assert not torch.equal(got, want)


def tiny_llama(seed: int):
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


LLAMA_SPECS = {
    "self_attn.q_proj": spec(4, gran="group", gs=16),
    "self_attn.k_proj": spec(3, sym=False, gran="channel"),
    "self_attn.v_proj": spec(2, sym=False, gran="group", gs=8),
    "self_attn.o_proj": spec(8, gran="channel"),
    "mlp.gate_proj": spec(8, fmt="fp8_e4m3", gran="channel"),
    "mlp.up_proj": spec(4, sym=False, gran="group", gs=32),
    "mlp.down_proj": None,
}


def llama_policy() -> Policy:
    layers = {f"model.layers.{i}.{k}": choice(s) for i in range(2) for k, s in LLAMA_SPECS.items()}
    layers["lm_head"] = choice(spec(8, gran="group", gs=16))
    return Policy(layers)


def test_llama_checkpoint_reproduces_fake_quant_logits(tmp_path):
    model, policy = tiny_llama(0), llama_policy()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    # one layer as GPTQ would hand it over: fake-quantized weights plus their scales
    name, s = "model.layers.1.self_attn.q_proj", LLAMA_SPECS["self_attn.q_proj"]
    w = model.get_submodule(name).weight.detach()
    x = torch.randn(64, w.shape[1])
    res = gptq_quantize(w, x.T @ x / 64, s)
    qweights = {name: QuantizedTensor.from_fake(res.weight, s, res.scale, res.zero_point)}
    save_quantized(tmp_path, model, policy, qweights)

    ref = fake_quantized_copy(model, policy)
    with torch.no_grad():
        ref.get_submodule(name).weight.copy_(res.weight)
        want = ref(ids).logits
        got = load_quantized(tmp_path, tiny_llama(1))(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_tied_lm_head_is_untied_on_load(tmp_path):
    model = tiny_llama(0)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    policy = Policy({"lm_head": choice(spec(4, gran="group", gs=16))})
    save_quantized(tmp_path, model, policy)
    fresh = tiny_llama(1)
    fresh.lm_head.weight = fresh.model.embed_tokens.weight
    loaded = load_quantized(tmp_path, fresh)
    emb = model.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, emb)
    assert torch.equal(loaded.lm_head.weight, fake_quantize(emb, policy.layers["lm_head"].weight))


def corrupt(tmp_path, how: str) -> None:
    if how == "missing meta":
        (tmp_path / META_FILE).unlink()
    elif how == "truncated weights":
        data = (tmp_path / WEIGHTS_FILE).read_bytes()
        (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    elif how == "garbage weights":
        (tmp_path / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    elif how == "future version":
        meta = json.loads((tmp_path / META_FILE).read_text())
        meta["format_version"] = 99
        (tmp_path / META_FILE).write_text(json.dumps(meta))
    elif how == "meta not json":
        (tmp_path / META_FILE).write_text("{")
    elif how == "policy disagrees":
        Policy({"0": choice(spec(4)), "2": None, "4": None}).save(tmp_path / "policy.json")
    elif how == "missing tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(tmp_path / WEIGHTS_FILE)
        del tensors["2.scales"]
        save_file(tensors, tmp_path / WEIGHTS_FILE)
    elif how == "bad scale shape":
        meta = json.loads((tmp_path / META_FILE).read_text())
        meta["layers"]["0"]["spec"]["group_size"] = 4
        meta["layers"]["0"]["group_size"] = 4
        (tmp_path / META_FILE).write_text(json.dumps(meta))
        layers = dict(MLP_POLICY.layers)
        layers["0"] = choice(spec(3, sym=False, gran="group", gs=4))
        Policy(layers).save(tmp_path / "policy.json")


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing meta", "quant_meta.json is missing"),
        ("truncated weights", "cannot read"),
        ("garbage weights", "cannot read"),
        ("future version", "unknown format version 99"),
        ("meta not json", "not valid JSON"),
        ("policy disagrees", "disagree"),
        ("missing tensor", "missing tensor '2.scales'"),
        ("bad scale shape", "'0.scales'"),
    ],
)
def test_corrupted_checkpoints_raise_smpq_error(tmp_path, how, message):
    save_quantized(tmp_path, tiny_mlp(), MLP_POLICY)
    corrupt(tmp_path, how)
    with pytest.raises(SmpqError, match=re.escape(message)):
        load_quantized(tmp_path, tiny_mlp())


def test_shape_mismatch_and_bad_inputs_raise(tmp_path):
    save_quantized(tmp_path, tiny_mlp(), MLP_POLICY)
    other = nn.Sequential(
        nn.Linear(24, 41), nn.ReLU(), nn.Linear(41, 17), nn.ReLU(), nn.Linear(17, 8)
    )
    with pytest.raises(SmpqError, match="mismatched shape"):
        load_quantized(tmp_path, other)
    with pytest.raises(SmpqError, match="missing"):
        load_quantized(tmp_path / "nowhere", tiny_mlp())
    model = tiny_mlp()
    wrong = QuantizedTensor.from_float(model[0].weight.detach(), spec(4))
    with pytest.raises(SmpqError, match="policy says|the policy says"):
        save_quantized(tmp_path / "b", model, MLP_POLICY, {"0": wrong})
    with pytest.raises(SmpqError, match="no module"):
        save_quantized(tmp_path / "c", model, Policy({"9": choice(spec(4))}))
    with pytest.raises(SmpqError):
        save_quantized(tmp_path / "d", model, MLP_POLICY, scale_dtype="bfloat16")


# -- other toolkits -------------------------------------------------------------------------

MIXED = Policy(
    {
        "model.layers.0.self_attn.q_proj": choice(spec(4, gran="group", gs=32)),
        "model.layers.0.self_attn.k_proj": choice(spec(4, sym=False, gran="group", gs=32)),
        "model.layers.0.self_attn.v_proj": choice(spec(4, gran="channel")),
        "model.layers.0.self_attn.o_proj": choice(spec(3, gran="group", gs=64)),
        "model.layers.1.mlp.gate_proj": choice(spec(2, gran="group", gs=16)),
        "model.layers.1.mlp.up_proj": choice(spec(5, gran="tensor")),
        "model.layers.1.mlp.down_proj": choice(spec(8, fmt="fp8_e4m3")),
        "model.layers.10.self_attn.q_proj": choice(spec(6, fmt="fp6_e3m2")),
        "model.layers.11.self_attn.q_proj": choice(spec(8)),
        "model.layers.1.self_attn.q_proj": None,
        "lm_head": choice(spec(6)),
        "model.embed_tokens": None,
        "model.mystery": choice(spec(4)),
    }
)
GGUF_EXPECTED = {
    "blk.0.attn_q": "q4_0",
    "blk.0.attn_k": "q4_1",
    "blk.0.attn_v": "q4_k",
    "blk.0.attn_output": "q3_k",
    "blk.1.ffn_gate": "q2_k",
    "blk.1.ffn_up": "q5_k",
    "blk.1.ffn_down": "q8_0",
    "blk.10.attn_q": "q6_k",
    "blk.11.attn_q": "q8_0",
    "blk.1.attn_q": "f16",
    "output": "q6_k",
    "token_embd": "f16",
}


def test_llama_cpp_args_parse_back_to_the_policy():
    args, warnings = llama_cpp_tensor_types(MIXED)
    assert args[0] == "--tensor-type"
    assert parse_tensor_type_args(args) == GGUF_EXPECTED
    assert any("model.mystery" in w and "skipped" in w for w in warnings)
    approx = [w for w in warnings if "approximated" in w]
    assert len(approx) == 2 and any("fp8_e4m3" in w for w in approx)
    # llama.cpp matches with std::regex_search on 'NAME.weight'; each pattern hits one tensor
    names = [f"{n}.weight" for n in GGUF_EXPECTED] + ["blk.0.attn_qkv.weight", "output_norm.weight"]
    for item in args[1::2]:
        pattern = item.rpartition("=")[0]
        assert len([n for n in names if re.search(pattern, n)]) == 1


def test_gguf_name_maps():
    assert gguf_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q"
    assert gguf_name("transformer.h.2.attn.c_attn", "gpt2") == "blk.2.attn_qkv"
    assert gguf_name("h.2.mlp.c_proj", "gpt2") == "blk.2.ffn_down"
    assert gguf_name("bert.encoder.layer.1.output.dense", "bert") == "blk.1.ffn_down"
    assert gguf_name("model.layers.3.self_attn.rotary", "llama") is None
    gpt2 = Policy({"transformer.h.0.attn.c_attn": LayerChoice.bits(4, 8)})
    args, warnings = llama_cpp_tensor_types(gpt2, "gpt2")
    assert parse_tensor_type_args(args) == {"blk.0.attn_qkv": "q4_k"}
    assert warnings == [
        "transformer.h.0.attn.c_attn: activation format int8 not exported (weight-only)"
    ]
    with pytest.raises(SmpqError):
        gguf_name("x", "t5")


def test_gptq_dynamic_regexes_match_exactly_their_layer():
    dynamic, warnings = gptq_dynamic(MIXED)
    names = [*MIXED.layers, "model.layers.1.self_attn.q_proj_extra", "model.layers.100.mlp"]
    assert len(dynamic) == len(MIXED.layers)
    for key, entry in dynamic.items():
        sign, pattern = key[:2], key[2:]
        hits = [n for n in names if re.match(pattern, n)]
        assert len(hits) == 1 and re.fullmatch(pattern, hits[0])
        layer = MIXED.layers[hits[0]]
        assert (sign == "-:") == (layer is None)
        if layer is not None:
            assert entry["bits"] in (2, 3, 4, 8) and entry["bits"] >= layer.weight.bits
            want_gs = layer.weight.group_size or -1
            assert entry["group_size"] == want_gs and entry["sym"] == layer.weight.symmetric
    assert any("lm_head" in w and "int8" in w for w in warnings)  # int6 rounds up
    assert any("fp6_e3m2" in w for w in warnings)


def test_torchao_snippet_compiles_and_json_round_trips():
    configs, warnings = torchao_configs(MIXED)
    text = torchao_snippet(configs)
    compile(text, "torchao_config.py", "exec")
    assert json.loads(json.dumps(configs)) == configs
    assert configs["model.layers.1.self_attn.q_proj"] is None
    assert configs["model.layers.0.self_attn.q_proj"]["config"] == "Int4WeightOnlyConfig"
    assert configs["model.layers.11.self_attn.q_proj"]["config"] == "Int8WeightOnlyConfig"
    gate = configs["model.layers.1.mlp.gate_proj"]
    assert gate == {
        "config": "IntxWeightOnlyConfig",
        "args": {
            "weight_dtype": "torch.int2",
            "granularity": "PerGroup(16)",
            "mapping_type": "MappingType.SYMMETRIC",
        },
    }
    assert configs["model.layers.1.mlp.down_proj"]["config"] == "Float8WeightOnlyConfig"
    assert '"model.layers.1.mlp.gate_proj": IntxWeightOnlyConfig(' in text
    assert any("tensor scales become per-channel" in w for w in warnings)


def test_hf_quantization_config():
    cfg, _ = hf_quantization_config(MIXED)
    cfg = json.loads(json.dumps(cfg))
    assert cfg["quant_method"] == "gptq" and cfg["bits"] in (2, 3, 4, 8)
    assert {"group_size", "sym", "desc_act", "dynamic", "checkpoint_format"} <= set(cfg)
    assert cfg["bits"] == 8 and cfg["group_size"] == -1 and cfg["lm_head"] is True
    transformers = pytest.importorskip("transformers")
    assert transformers.GPTQConfig.from_dict(cfg).bits == 8
    with pytest.raises(SmpqError):
        hf_quantization_config(Policy({"a": None}))


def test_write_exports_writes_every_file(tmp_path):
    paths = write_exports(tmp_path, MIXED, arch="llama")
    assert {p.name for p in paths.values()} == {
        "llama_cpp_tensor_types.txt",
        "gptqmodel_dynamic.json",
        "torchao_config.py",
        "torchao_config.json",
        "hf_quantization_config.json",
        "EXPORTS.md",
    }
    lines = paths["llama_cpp"].read_text().split()
    assert parse_tensor_type_args([a for ln in lines for a in ("--tensor-type", ln)]) == (
        GGUF_EXPECTED
    )
    assert json.loads(paths["gptqmodel"].read_text()) == gptq_dynamic(MIXED)[0]
    readme = paths["readme"].read_text()
    assert "fp8_e4m3" in readme and "model.mystery" in readme
    with pytest.raises(SmpqError):
        write_exports(tmp_path, MIXED, arch="t5")
