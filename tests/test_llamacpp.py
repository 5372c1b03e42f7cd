"""llama.cpp export: tensor-type files, refusals, tool discovery (always run) and, when the
tools of scripts/build_llamacpp.sh exist, a real convert -> quantize -> read-back round trip.

Expected types and lines are written out by hand from llama.cpp's rules (block sizes from
ggml's type_traits, tensor_type_fallback in src/llama-quant.cpp), not taken from the code.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from smpq.errors import SmpqError
from smpq.export import llamacpp as lc
from smpq.export.targets import gguf_type
from smpq.policy import Policy
from smpq.spec import Granularity, LayerChoice, QuantSpec


def _spec(bits: int, group: int | None = 32, sym: bool = False) -> QuantSpec:
    gran = Granularity.GROUP if group else Granularity.CHANNEL
    return QuantSpec(bits=bits, symmetric=sym, granularity=gran, group_size=group)


def _policy(specs: dict[str, QuantSpec | None]) -> Policy:
    return Policy({n: None if s is None else LayerChoice(s, None) for n, s in specs.items()})


L0 = "model.layers.0."
MIXED = {  # module -> (spec, the ggml type llama.cpp must store)
    L0 + "self_attn.q_proj": (_spec(4, sym=True), "q4_0"),
    L0 + "self_attn.k_proj": (_spec(4), "q4_1"),
    L0 + "self_attn.v_proj": (_spec(8, sym=True), "q8_0"),
    L0 + "self_attn.o_proj": (_spec(3), "q3_k"),
    L0 + "mlp.gate_proj": (_spec(2), "q2_k"),
    L0 + "mlp.up_proj": (_spec(6, group=None, sym=True), "q6_k"),
    L0 + "mlp.down_proj": (_spec(5, group=None, sym=True), "q5_k"),
}


# -- always run: pure functions ----------------------------------------------------------------


def test_tensor_type_file_lines():
    policy = _policy({k: s for k, (s, _) in MIXED.items()})
    text = lc.tensor_type_file(policy, "llama")
    assert text == (
        "^blk\\.0\\.attn_q\\.weight$=q4_0\n"
        "^blk\\.0\\.attn_k\\.weight$=q4_1\n"
        "^blk\\.0\\.attn_v\\.weight$=q8_0\n"
        "^blk\\.0\\.attn_output\\.weight$=q3_k\n"
        "^blk\\.0\\.ffn_gate\\.weight$=q2_k\n"
        "^blk\\.0\\.ffn_up\\.weight$=q6_k\n"
        "^blk\\.0\\.ffn_down\\.weight$=q5_k\n"
    )


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q2_k",
                                 "q3_k", "q4_k", "q5_k", "q6_k"])
def test_gguf_block_formats_map_to_themselves(fmt):
    # the GGUF candidate formats (QuantSpec.fmt = the ggml type name) map exactly
    from smpq.blockformats import block_format
    from smpq.spec import QuantSpec

    spec = QuantSpec(bits=block_format(fmt).nominal_bits, fmt=fmt)
    assert gguf_type(spec) == (fmt, False)


SHAPES = {  # torch order (rows, cols)
    "blk.0.attn_q": (256, 576),  # 576 = 18 x 32, not a multiple of 256
    "blk.0.ffn_down": (576, 1536),  # 1536 = 6 x 256
    "token_embd": (1000, 576),
}


def test_plan_accepts_types_whose_blocks_divide_rows():
    plan = {"blk.0.attn_q": "Q4_0", "blk.0.ffn_down": "q2_k", "token_embd": "iq4_nl"}
    assert lc.plan_types(plan, SHAPES) == {"blk.0.attn_q": "q4_0", "blk.0.ffn_down": "q2_k",
                                           "token_embd": "iq4_nl"}


@pytest.mark.parametrize(("name", "typ", "shown"), [
    ("blk.0.attn_q", "q2_k", "q2_k -> q4_0"),
    ("blk.0.attn_q", "q3_k", "q3_k -> q4_0"),
    ("blk.0.attn_q", "q4_k", "q4_k -> q5_0"),
    ("blk.0.attn_q", "q6_k", "q6_k -> q8_0"),
    ("token_embd", "q5_k", "q5_k -> q5_1"),
])
def test_plan_refuses_silent_fallbacks(name, typ, shown):
    with pytest.raises(SmpqError) as exc:
        lc.plan_types({name: typ, "blk.0.ffn_down": "q2_k"}, SHAPES)
    msg = str(exc.value)
    assert "\n" not in msg and shown in msg and "1 of 2" in msg and "576 columns" in msg


def test_plan_refuses_overrides_under_an_unquantized_base():
    # llama-quantize ignores --tensor-type when the base type is f16 / f32
    with pytest.raises(SmpqError, match="base type f16"):
        lc.plan_types({"blk.0.ffn_down": "q2_k"}, SHAPES, base_type="f16")


def test_policy_with_int2_on_576_columns_is_refused():
    # the issue's case: int2 -> q2_k on SmolLM2's 576-column projections
    policy = _policy({L0 + "self_attn.q_proj": _spec(2), L0 + "mlp.down_proj": _spec(2)})
    with pytest.raises(SmpqError, match=r"1 of 2 .*blk\.0\.attn_q: q2_k -> q4_0"):
        lc.plan_types(policy, SHAPES)


def test_tied_output_request_goes_to_token_embd():
    shapes = {"token_embd": (1000, 256)}
    assert lc.plan_types({"output": "q6_k"}, shapes) == {"token_embd": "q6_k"}
    assert lc.plan_types({"output": "q6_k", "token_embd": "q6_k"}, shapes) == {
        "token_embd": "q6_k"}
    with pytest.raises(SmpqError, match="tied embeddings"):
        lc.plan_types({"output": "q6_k", "token_embd": "q8_0"}, shapes)


def test_parse_perplexity_reads_the_final_estimate():
    text = ("perplexity: tokenizing the input ..\n"
            "perplexity: calculating perplexity over 8 chunks, n_ctx=512, batch_size=2048, "
            "n_seq=4\n[1]17.5,[2]19.0,[3]20.1\nFinal estimate: PPL = 20.4813 +/- 0.61234\n")
    assert lc.parse_perplexity(text) == {"perplexity": 20.4813, "stderr": 0.61234,
                                         "chunks": 8, "ctx": 512}
    with pytest.raises(SmpqError, match="no final estimate"):
        lc.parse_perplexity("perplexity: you need at least 1024 tokens\n")


def _fake_tools(root):
    for rel in ("bin/llama-quantize", "bin/llama-perplexity", "src/convert_hf_to_gguf.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    (root / "src" / "gguf-py").mkdir()
    return root


def test_find_tools_missing_names_the_build_script(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(SmpqError) as exc:
        lc.find_tools()
    assert lc.BUILD_SCRIPT in str(exc.value) and "\n" not in str(exc.value)
    monkeypatch.setenv(lc.ENV_VAR, str(_fake_tools(tmp_path / "lc")))
    assert lc.find_tools().root == tmp_path / "lc"


def _llama_folder(path, hidden=576, inter=1536, heads=9):
    path.mkdir()
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
           "num_attention_heads": heads, "head_dim": hidden // heads}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_check_gguf_export(tmp_path, monkeypatch):
    folder = str(_llama_folder(tmp_path / "m"))
    monkeypatch.setenv(lc.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(SmpqError, match="build_llamacpp.sh"):
        lc.check_gguf_export(folder, "int4g32,int8g32")
    with pytest.raises(SmpqError, match="Llama-architecture"):
        lc.check_gguf_export("tiny-lm", "int4g32,int8g32")
    monkeypatch.setenv(lc.ENV_VAR, str(_fake_tools(tmp_path / "lc")))
    assert lc.check_gguf_export(folder, "int4g32,int8g32").root == tmp_path / "lc"
    with pytest.raises(SmpqError, match=r"int2g32 becomes q2_k .* rows of 576 \(hidden_size\)"):
        lc.check_gguf_export(folder, "int2g32,int4g32,int8g32")
    # 256-divisible rows take k-quants
    wide = str(_llama_folder(tmp_path / "w", hidden=512, inter=1024, heads=8))
    lc.check_gguf_export(wide, "int2g32,int3g32,int4g32")


def test_ptq_export_gguf_without_tools_is_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                       capsys):
    from smpq.cli import main
    from smpq.transformer import run as run_mod

    folder = _llama_folder(tmp_path / "m")
    out = tmp_path / "out"
    monkeypatch.setenv(lc.ENV_VAR, str(tmp_path / "nowhere"))

    def never(*args, **kwargs):
        raise AssertionError("an expensive step ran before the input was refused")

    monkeypatch.setattr(run_mod, "PTQSession", never)
    monkeypatch.setattr(sys, "argv", ["smpq", "ptq", "--model", str(folder), "--out", str(out),
                                      "--export", "gguf"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error:") and "build_llamacpp.sh" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_export_is_refused(tmp_path):
    from smpq.transformer.run import run_ptq

    with pytest.raises(SmpqError, match="unknown export 'onnx'"):
        run_ptq("tiny-lm", "avg_bits=4", out=tmp_path / "o", export="onnx")
    assert not (tmp_path / "o").exists()


# -- with the tools: a real round trip ----------------------------------------------------------

try:
    TOOLS = lc.find_tools()
    NO_TOOLS = ""
except SmpqError as _exc:
    TOOLS, NO_TOOLS = None, f"llama.cpp tools absent ({_exc})"
needs_tools = pytest.mark.skipif(TOOLS is None, reason=NO_TOOLS.split(":")[0] + f": run "
                                 f"{lc.BUILD_SCRIPT}")

WORDS = ("the of and to in is was for on that with as by at from his an were are which this "
         "be has had it not or but have one their first new after who all also two been its "
         "time river city year people state world music war film school game").split()


VOCAB = 320  # 3 specials + 256 byte pieces + merges


def _sentencepiece_folder(path, hidden=256, inter=512, layers=2):
    """A random Llama with a tiny sentencepiece vocabulary trained here (no download)."""
    import io
    import random

    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    import torch

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)  # llama.cpp's SPM tokenizer needs bytes
    path.mkdir()
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))  # transformers builds its tokenizer from tokenizer.model
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path, "\n".join(lines)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    if TOOLS is None:
        pytest.skip(NO_TOOLS)
    root = tmp_path_factory.mktemp("gguf")
    folder, text = _sentencepiece_folder(root / "model")
    (root / "text.txt").write_text(text)
    return lc.convert_hf(folder, root / "cache", "f32", TOOLS), root


@needs_tools
def test_convert_is_cached_by_content(tiny_gguf):
    src, root = tiny_gguf
    assert src.parent == root / "cache" / "gguf" and src.suffix == ".gguf"
    mtime = src.stat().st_mtime_ns
    assert lc.convert_hf(root / "model", root / "cache", "f32", TOOLS) == src
    assert src.stat().st_mtime_ns == mtime  # not rebuilt
    info = lc.gguf_summary(src)
    assert info["types"]["blk.0.attn_q"] == "f32"
    assert lc.gguf_shapes(src)["blk.1.ffn_down"] == (256, 512)


@needs_tools
def test_quantize_stores_every_planned_type(tiny_gguf, tmp_path):
    src, root = tiny_gguf
    specs = {k: s for k, (s, _) in MIXED.items()}
    specs["model.layers.1.self_attn.q_proj"] = _spec(2)  # layer 1 and the output: others
    specs["model.layers.1.mlp.down_proj"] = _spec(4, sym=True)
    specs["lm_head"] = _spec(6, group=None, sym=True)
    want = {f"blk.0.{k}": t for k, t in (("attn_q", "q4_0"), ("attn_k", "q4_1"),
                                         ("attn_v", "q8_0"), ("attn_output", "q3_k"),
                                         ("ffn_gate", "q2_k"), ("ffn_up", "q6_k"),
                                         ("ffn_down", "q5_k"))}
    want.update({"blk.1.attn_q": "q2_k", "blk.1.ffn_down": "q4_0", "output": "q6_k"})
    res = lc.quantize(src, _policy(specs), tmp_path / "m.gguf", "q8_0", tools=TOOLS)
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "m.gguf"))
    stored = {t.name.removesuffix(".weight"): t for t in reader.tensors}
    blocks = {"q4_0": (32, 18), "q4_1": (32, 20), "q8_0": (32, 34), "q2_k": (256, 84),
              "q3_k": (256, 110), "q5_k": (256, 176), "q6_k": (256, 210)}
    for name, typ in want.items():
        t = stored[name]
        assert t.tensor_type.name.lower() == typ, name
        per, nbytes = blocks[typ]
        assert int(t.n_bytes) == int(t.n_elements) // per * nbytes, name
    assert res["file_bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert (tmp_path / "m.gguf.tensor_types.txt").read_text().count("\n") == len(want)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@needs_tools
def test_quantize_refuses_before_running(tiny_gguf, tmp_path):
    src, _ = tiny_gguf
    # every row here divides 256, so the replacement comes from an unquantized base type
    with pytest.raises(SmpqError, match="silently replace"):
        lc.quantize(src, {"blk.0.attn_q": "q4_k"}, tmp_path / "x.gguf", "f16", tools=TOOLS)
    assert not os.listdir(tmp_path)


@needs_tools
def test_perplexity_of_f32_and_q8_0(tiny_gguf, tmp_path):
    src, root = tiny_gguf
    res = lc.perplexity(src, root / "text.txt", ctx=64, chunks=4, tools=TOOLS)
    assert res["chunks"] == 4 and res["ctx"] == 64 and res["file_bytes"] == src.stat().st_size
    # a random model over 320 tokens: perplexity near the vocabulary size, far from 1
    assert 50 < res["perplexity"] < 3000
    q8 = lc.quantize(src, {}, tmp_path / "q8.gguf", "Q8_0", tools=TOOLS)
    assert set(q8["type_counts"]) == {"q8_0", "f32"}  # f32: the 1-D norms
    res8 = lc.perplexity(tmp_path / "q8.gguf", root / "text.txt", ctx=64, chunks=4, tools=TOOLS)
    assert abs(res8["perplexity"] / res["perplexity"] - 1) < 0.01  # q8_0 is near lossless
    assert res8["file_bytes"] < 0.3 * res["file_bytes"]


@pytest.mark.slow  # ~1-4 min: the whole Wikipedia text is tokenized by a byte-fallback SPM
@needs_tools
def test_ptq_export_gguf_end_to_end(tiny_gguf, tmp_path):
    """smpq ptq --export gguf on the tiny Llama: the file llama.cpp wrote holds the policy."""
    pytest.importorskip("transformers")
    from smpq.transformer.run import RunSettings, ptq_command

    _, root = tiny_gguf
    settings_cache = str(root / "cache")
    text = ptq_command(model=str(root / "model"), budget="avg_bits=6", method="fisher",
                       out=str(tmp_path / "out"), candidates="int4g32-sym,int8g32-sym",
                       cache_dir=settings_cache, export="gguf")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    g = summary["gguf"]
    assert f"llama-perplexity {g['llama_perplexity']:.4f}" in text.splitlines()[-1]
    gguf_file = tmp_path / "out" / "exports" / "model.gguf"
    assert g["file_bytes"] == gguf_file.stat().st_size and g["chunks"] >= 1
    policy = json.loads((tmp_path / "out" / "policy.json").read_text())["layers"]
    by_bits = {4: "q4_0", 8: "q8_0"}  # group 32, symmetric
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
             "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down"}
    stored = lc.gguf_summary(gguf_file)["types"]
    assert len(policy) == 14
    for fqn, choice in policy.items():
        layer, module = fqn.split(".")[2], fqn.split(".")[-1]
        assert stored[f"blk.{layer}.{names[module]}"] == by_bits[choice["weight"]["bits"]]
    assert {stored["token_embd"], stored["output"]} <= {"q8_0", "q6_k"}  # base Q8_0's defaults
    assert RunSettings().cache_dir != settings_cache
