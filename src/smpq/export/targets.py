"""A Policy in other toolkits' terms: llama.cpp, GPTQModel, torchao, Hugging Face configs.

Each translator returns its result and a list of warnings; a warning names every layer whose
format has no exact counterpart (the nearest one is used) and every layer that was skipped.
Only weight formats are translated (activation specs have no counterpart here). The toolkits
re-quantize from float weights with these per-layer formats; no codes or scales move.

Checked against the toolkits' sources (ggml-org/llama.cpp tools/quantize + src/llama-quant.cpp,
ModelCloud/GPTQModel quantization/config.py `dynamic_get`, pytorch/ao `FqnToConfig` docs):
* llama-quantize `--tensor-type PATTERN=TYPE` (repeatable; `--tensor-type-file` reads the
  same items separated by whitespace). PATTERN is lowercased and used with std::regex_search on
  GGUF tensor names such as `blk.3.attn_q.weight`; the first matching pattern wins, so the
  patterns here are escaped and anchored. Types are ggml type names, case-insensitive.
* GPTQModel `dynamic`: {"+:regex": {overrides}, "-:regex": {}} tried in order with re.match
  on the module's full name; "-:" leaves the module unquantized. GPTQ supports 2/3/4/8 bits.
* torchao `FqnToConfig` (`ModuleFqnToConfig` before torchao 0.15): exact module FQN -> config,
  None = leave float.

Why one module past ~400 lines: the translators (llama.cpp, GPTQModel and its Hugging Face
config, torchao) share the weight lookup, the warning rules and `write_exports`, which writes
all of them with one README; each is a small table plus a function (~60-100 lines). A new
toolkit is the point to split into one module per toolkit.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text
from smpq.policy import Policy
from smpq.spec import Granularity, QuantSpec

__all__ = [
    "GGML_BLOCKS",
    "GGUF_NAME_MAPS",
    "GPTQ_BITS",
    "LLAMA_CPP_FALLBACK",
    "ResolvedType",
    "ggml_bits_per_weight",
    "gguf_name",
    "gguf_type",
    "gptq_dynamic",
    "hf_quantization_config",
    "llama_cpp_actual_types",
    "llama_cpp_fallbacks",
    "llama_cpp_tensor_types",
    "parse_tensor_type_args",
    "torchao_configs",
    "torchao_snippet",
    "write_exports",
]

Warnings = list[str]
NameMap = tuple[tuple[str, str], ...]  # (regex on the module FQN, GGUF name template)

# -- GGUF names (gguf-py tensor_mapping.py) ---------------------------------------------------

_LLAMA = (
    (r"model\.layers\.(\d+)\.self_attn\.q_proj", "blk.{}.attn_q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj", "blk.{}.attn_k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj", "blk.{}.attn_v"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", "blk.{}.attn_output"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj", "blk.{}.ffn_gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj", "blk.{}.ffn_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj", "blk.{}.ffn_down"),
    (r"lm_head", "output"),
    (r"model\.embed_tokens", "token_embd"),
)
_GPT2 = (  # GPT2LMHeadModel names start with "transformer.", GPT2Model names do not
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_attn", "blk.{}.attn_qkv"),
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_proj", "blk.{}.attn_output"),
    (r"(?:transformer\.)?h\.(\d+)\.mlp\.c_fc", "blk.{}.ffn_up"),
    (r"(?:transformer\.)?h\.(\d+)\.mlp\.c_proj", "blk.{}.ffn_down"),
    (r"lm_head", "output"),
    (r"(?:transformer\.)?wte", "token_embd"),
)
_BERT = (  # task models prefix "bert."
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.query", "blk.{}.attn_q"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.key", "blk.{}.attn_k"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.self\.value", "blk.{}.attn_v"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.attention\.output\.dense", "blk.{}.attn_output"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense", "blk.{}.ffn_up"),
    (r"(?:bert\.)?encoder\.layer\.(\d+)\.output\.dense", "blk.{}.ffn_down"),
    (r"(?:bert\.)?embeddings\.word_embeddings", "token_embd"),
)
GGUF_NAME_MAPS: dict[str, NameMap] = {"llama": _LLAMA, "gpt2": _GPT2, "bert": _BERT}


def _arch_map(arch: str) -> NameMap:
    if arch not in GGUF_NAME_MAPS:
        raise SmpqError(f"unknown architecture {arch!r}; known: {', '.join(GGUF_NAME_MAPS)}")
    return GGUF_NAME_MAPS[arch]


def gguf_name(fqn: str, arch: str = "llama") -> str | None:
    """GGUF tensor base name (without '.weight') of a Hugging Face module, None if unknown."""
    for pattern, template in _arch_map(arch):
        m = re.fullmatch(pattern, fqn)
        if m:
            return template.format(*m.groups())
    return None


# -- GGUF types -------------------------------------------------------------------------------

GgufChoice = tuple[str, bool]  # (ggml type name, approximate?)


def _gguf_int4(spec: QuantSpec) -> GgufChoice:
    if spec.granularity is Granularity.GROUP and spec.group_size == 32:
        return ("q4_0" if spec.symmetric else "q4_1"), False
    return "q4_k", False


_GGUF_INT: dict[int, Callable[[QuantSpec], GgufChoice]] = {
    1: lambda s: ("q2_k", True),
    2: lambda s: ("q2_k", False),
    3: lambda s: ("q3_k", False),
    4: _gguf_int4,
    5: lambda s: ("q5_k", False),
    6: lambda s: ("q6_k", False),
    7: lambda s: ("q8_0", True),
    8: lambda s: ("q8_0", False),
}
_GGUF_FLOAT_BY_BITS = {8: "q8_0", 6: "q6_k", 4: "q4_k"}  # no minifloat weight types: by bits


def gguf_type(spec: QuantSpec | None) -> GgufChoice:
    """Nearest ggml type for a weight format and whether it is only approximate."""
    if spec is None:
        return "f16", False
    if spec.is_block:  # a GGUF block format is its own type
        return spec.fmt, False
    if spec.is_float:
        return _GGUF_FLOAT_BY_BITS[spec.bits], True
    return _GGUF_INT[spec.bits](spec)


def _weight(policy: Policy, name: str) -> QuantSpec | None:
    choice = policy.layers[name]
    return choice.weight if choice is not None else None


def _act_warnings(policy: Policy) -> Warnings:
    return [
        f"{n}: activation format {c.act.label} not exported (weight-only)"
        for n, c in policy.layers.items()
        if c is not None and c.act is not None
    ]


def _label(spec: QuantSpec | None) -> str:
    return "float" if spec is None else spec.label + ("" if spec.symmetric else " asym")


def llama_cpp_tensor_types(policy: Policy, arch: str = "llama") -> tuple[list[str], Warnings]:
    """`llama-quantize` arguments: ['--tensor-type', '^blk\\.3\\.attn_q\\.weight$=q4_k', ...]."""
    args, warnings = [], _act_warnings(policy)
    for name in policy.layers:
        base = gguf_name(name, arch)
        if base is None:
            warnings.append(f"{name}: no GGUF tensor name for arch {arch!r}; skipped")
            continue
        spec = _weight(policy, name)
        typ, approx = gguf_type(spec)
        if approx:
            warnings.append(f"{name}: {_label(spec)} has no GGUF type; approximated by {typ}")
        args += ["--tensor-type", f"^{re.escape(base + '.weight')}$={typ}"]
    return args, warnings


def parse_tensor_type_args(args: list[str]) -> dict[str, str]:
    """{GGUF base name: type} from `llama_cpp_tensor_types` arguments (for checking them)."""
    if len(args) % 2 or any(flag != "--tensor-type" for flag in args[::2]):
        raise SmpqError("expected pairs of '--tensor-type', 'PATTERN=TYPE'")
    out = {}
    for item in args[1::2]:
        pattern, sep, typ = item.rpartition("=")
        m = re.fullmatch(r"\^(.+)\\\.weight\$", pattern)
        if not sep or not m:
            raise SmpqError(f"not an anchored tensor pattern: {item!r}")
        out[re.sub(r"\\(.)", r"\1", m.group(1))] = typ
    return out


# -- the types llama.cpp will actually store ---------------------------------------------------
# Checked against llama.cpp as vendored in llama-cpp-python 0.3.36 (src/llama-quant.cpp:
# tensor_allows_quantization, llama_tensor_get_type, tensor_type_fallback): a --tensor-type
# override is applied, then a type whose block does not divide the row length (ne[0], the
# last torch dimension) is silently replaced by its fallback, or by f16 if that does not fit.

# ggml type -> (weights per block, bytes per block), as ggml's type_traits.
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2),
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "iq4_nl": (32, 18), "mxfp4": (32, 17),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176),
    "q6_k": (256, 210), "iq1_s": (256, 50), "iq1_m": (256, 56), "iq2_xxs": (256, 66),
    "iq2_xs": (256, 74), "iq2_s": (256, 82), "iq3_xxs": (256, 98), "iq3_s": (256, 110),
    "iq4_xs": (256, 136), "tq1_0": (256, 54), "tq2_0": (256, 66),
}
# tensor_type_fallback: 256-block types -> a 32-block type; 32-block types have none (-> f16).
LLAMA_CPP_FALLBACK: dict[str, str] = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s",
                     "iq4_xs"), "iq4_nl"),
    **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
    "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
}
_UNQUANTIZED = frozenset({"f32", "f16", "bf16"})


def _ggml_block(typ: str) -> tuple[int, int]:
    if typ.lower() not in GGML_BLOCKS:
        raise SmpqError(f"unknown ggml type {typ!r}; known: {', '.join(GGML_BLOCKS)}")
    return GGML_BLOCKS[typ.lower()]


def ggml_bits_per_weight(typ: str) -> float:
    """Bits per weight on disk, scales and minimums included (q4_0: 4.5, q2_k: 2.625)."""
    per_block, nbytes = _ggml_block(typ)
    return 8 * nbytes / per_block


class ResolvedType(NamedTuple):
    """A requested ggml type and the one llama-quantize stores (None: left in its input type)."""

    requested: str
    actual: str | None

    @property
    def replaced(self) -> bool:
        return self.actual != self.requested


def _stored_type(name: str, shape: Sequence[int], typ: str) -> str | None:
    if len(shape) < 2 or name.endswith("_norm"):  # llama.cpp never quantizes these
        return None
    ncols, per_block = int(shape[-1]), _ggml_block(typ)[0]
    if ncols % per_block == 0:
        return typ
    if typ not in LLAMA_CPP_FALLBACK and per_block > 32:
        raise SmpqError(f"llama.cpp defines no fallback for {typ} ({name}, {ncols} columns)")
    fallback = LLAMA_CPP_FALLBACK.get(typ, typ)
    return fallback if ncols % _ggml_block(fallback)[0] == 0 else "f16"


def llama_cpp_actual_types(
    shapes: Mapping[str, Sequence[int]], requested: Mapping[str, str], base_type: str = "q8_0"
) -> dict[str, ResolvedType]:
    """{GGUF base name: (requested, actual)} for `llama-quantize --tensor-type` requests.

    shapes: GGUF base name (e.g. 'blk.0.attn_q') -> weight shape in torch order (rows, cols);
    requested: base name -> ggml type (as `parse_tensor_type_args` returns). With an
    unquantized base type (f16/f32/bf16) llama-quantize ignores every override. A request
    for a tensor that is not in `shapes` matches nothing, so it is an error here.
    """
    base = base_type.lower()
    _ggml_block(base)
    missing = sorted(set(requested) - set(shapes))
    if missing:
        raise SmpqError(
            f"{len(missing)} requested tensors are not in the model, e.g. {missing[0]!r}"
        )
    out = {}
    for name, typ in requested.items():
        typ = typ.lower()
        _ggml_block(typ)
        actual = base if base in _UNQUANTIZED else _stored_type(name, shapes[name], typ)
        out[name] = ResolvedType(typ, actual)
    return out


def llama_cpp_fallbacks(
    shapes: Mapping[str, Sequence[int]], requested: Mapping[str, str], base_type: str = "q8_0"
) -> dict[str, ResolvedType]:
    """Only the requests llama.cpp would silently replace (see `llama_cpp_actual_types`)."""
    resolved = llama_cpp_actual_types(shapes, requested, base_type)
    return {name: r for name, r in resolved.items() if r.replaced}


# -- GPTQModel dynamic -----------------------------------------------------------------------

GPTQ_BITS = (2, 3, 4, 8)


def _gptq_bits(spec: QuantSpec) -> tuple[int, bool]:
    """Fewest GPTQ bits >= the planned bits (never coarser); minifloats are approximate."""
    bits = min(b for b in GPTQ_BITS if b >= spec.bits)
    return bits, spec.fmt != "int" or bits != spec.bits


def _module_regex(name: str) -> str:
    return f"^{re.escape(name)}$"


def gptq_dynamic(policy: Policy) -> tuple[dict[str, dict], Warnings]:
    """GPTQModel `dynamic`: '+:^name$' -> bits / group_size / sym, '-:^name$' -> {} for float."""
    dynamic, warnings = {}, _act_warnings(policy)
    for name in policy.layers:
        spec = _weight(policy, name)
        if spec is None:
            dynamic["-:" + _module_regex(name)] = {}
            continue
        bits, approx = _gptq_bits(spec)
        if approx:
            warnings.append(f"{name}: {_label(spec)} is not a GPTQ format; using int{bits}")
        if spec.granularity is Granularity.TENSOR:
            warnings.append(f"{name}: GPTQ has no per-tensor scales; using per-channel")
        group = spec.group_size if spec.granularity is Granularity.GROUP else -1
        entry = {"bits": bits, "group_size": group, "sym": spec.symmetric, "desc_act": False}
        dynamic["+:" + _module_regex(name)] = entry
    return dynamic, warnings


def hf_quantization_config(policy: Policy) -> tuple[dict, Warnings]:
    """`quantization_config` for config.json: a GPTQ config whose base is the most common format.

    The base bits / group_size / sym are the most common among quantized layers; `dynamic`
    then pins every layer. GPTQModel and vLLM read `dynamic`; transformers' own GPTQConfig
    class keeps only the base fields.
    """
    dynamic, warnings = gptq_dynamic(policy)
    entries = [v for k, v in dynamic.items() if k.startswith("+:")]
    if not entries:
        raise SmpqError("the policy quantizes no weights: there is no quantization_config")

    def common(key: str):
        return Counter(e[key] for e in entries).most_common(1)[0][0]

    quantized = {n for n in policy.layers if _weight(policy, n) is not None}
    config = {
        "quant_method": "gptq",
        "bits": common("bits"),
        "group_size": common("group_size"),
        "sym": common("sym"),
        "desc_act": False,
        "checkpoint_format": "gptq",
        "lm_head": any(n.split(".")[-1] == "lm_head" for n in quantized),
        "dynamic": dynamic,
        "meta": {"quantizer": ["smpq"], "note": "per-layer formats from an smpq policy"},
    }
    return config, warnings


# -- torchao ---------------------------------------------------------------------------------

TorchaoChoice = tuple[dict, bool]  # ({"config": class name, "args": {name: python expr}}, approx)
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _granularity(spec: QuantSpec) -> str:
    return f"PerGroup({spec.group_size})" if spec.granularity is Granularity.GROUP else "PerAxis(0)"


def _intx(spec: QuantSpec, bits: int) -> dict:
    mapping = "MappingType." + ("SYMMETRIC" if spec.symmetric else "ASYMMETRIC")
    args = {"weight_dtype": f"torch.int{bits}", "granularity": _granularity(spec)}
    return {"config": "IntxWeightOnlyConfig", "args": {**args, "mapping_type": mapping}}


def _torchao_int(spec: QuantSpec) -> TorchaoChoice:
    """Exact where torchao has smpq's grid: asymmetric specs -> IntxWeightOnlyConfig
    ASYMMETRIC (same scale, rounded zero point; bit-identical on CPU with torchao 0.18).
    torchao's symmetric scale is amax / ((qmax - qmin) / 2) (int4: amax / 7.5), smpq's
    amax / qmax (amax / 7), so no symmetric spec is exact: those use the kernel configs where
    they fit (Int8WeightOnlyConfig; Int4WeightOnlyConfig, its own zero-point scheme, no CPU
    path in torchao 0.18) and IntxWeightOnlyConfig SYMMETRIC otherwise, all approximate."""
    group = spec.granularity is Granularity.GROUP
    if not spec.symmetric:
        return _intx(spec, spec.bits), False
    if spec.bits == 8 and not group:
        return {"config": "Int8WeightOnlyConfig", "args": {}}, True
    if spec.bits == 4 and group and spec.group_size in _INT4_KERNEL_GROUPS:
        args = {"group_size": str(spec.group_size)}
        return {"config": "Int4WeightOnlyConfig", "args": args}, True
    return _intx(spec, spec.bits), True  # int1: torchao's is {-1, 0}, not sign x scale


def _torchao_fp8(spec: QuantSpec) -> TorchaoChoice:
    dtype = {"fp8_e4m3": "torch.float8_e4m3fn", "fp8_e5m2": "torch.float8_e5m2"}[spec.fmt]
    return {"config": "Float8WeightOnlyConfig", "args": {"weight_dtype": dtype}}, False


def _torchao_fp6(spec: QuantSpec) -> TorchaoChoice:
    fmt = spec.minifloat
    args = {"ebits": str(fmt.exp_bits), "mbits": str(fmt.man_bits)}
    return {"config": "FPXWeightOnlyConfig", "args": args}, False


def _torchao_fp4(spec: QuantSpec) -> TorchaoChoice:
    return _intx(spec, 4), True


def _torchao_block(spec: QuantSpec) -> TorchaoChoice:
    """A GGUF block format: integers of its nominal width in its blocks (approximate)."""
    return _intx(spec, spec.bits), True


_TORCHAO: dict[str, Callable[[QuantSpec], TorchaoChoice]] = {
    "int": _torchao_int,
    "fp8_e4m3": _torchao_fp8,
    "fp8_e5m2": _torchao_fp8,
    "fp6_e3m2": _torchao_fp6,
    "fp6_e2m3": _torchao_fp6,
    "fp4_e2m1": _torchao_fp4,
}
_PER_ROW_ONLY = {"Float8WeightOnlyConfig", "FPXWeightOnlyConfig"}


def torchao_configs(policy: Policy) -> tuple[dict[str, dict | None], Warnings]:
    """{FQN: {"config": name, "args": {arg: python expression}} or None (float)}."""
    configs: dict[str, dict | None] = {}
    warnings = _act_warnings(policy)
    for name in policy.layers:
        spec = _weight(policy, name)
        if spec is None:
            configs[name] = None
            continue
        cfg, approx = _TORCHAO.get(spec.fmt, _torchao_block)(spec)
        if approx:
            warnings.append(f"{name}: {_label(spec)} approximated by {cfg['config']}")
        coarse = spec.granularity is Granularity.TENSOR
        if coarse or (cfg["config"] in _PER_ROW_ONLY and spec.granularity is Granularity.GROUP):
            warnings.append(f"{name}: {spec.granularity.value} scales become per-channel")
        configs[name] = cfg
    return configs, warnings


def _call(cfg: dict | None) -> str:
    if cfg is None:
        return "None"
    return f"{cfg['config']}({', '.join(f'{k}={v}' for k, v in cfg['args'].items())})"


def torchao_snippet(configs: dict[str, dict | None]) -> str:
    """Python source building an `FqnToConfig` named `config` (paste it, then `quantize_`)."""
    used = sorted({c["config"] for c in configs.values() if c is not None})
    lines = [
        "# Per-layer torchao weight-only configs generated by smpq from a mixed-precision policy.",
        "import torch",
        "from torchao.quantization import (",
        *(f"    {name}," for name in used),
        "    quantize_,",
        ")",
        "from torchao.quantization.granularity import PerAxis, PerGroup",
        "from torchao.quantization.quant_primitives import MappingType",
        "",
        "try:",
        "    from torchao.quantization import FqnToConfig",
        "except ImportError:  # torchao < 0.15",
        "    from torchao.quantization import ModuleFqnToConfig as FqnToConfig",
        "",
        "config = FqnToConfig({",
        *(f"    {json.dumps(name)}: {_call(cfg)}," for name, cfg in configs.items()),
        "})",
        "# quantize_(model, config, filter_fn=None)  # torchao >= 0.15 (checked with 0.18);",
        "# older torchao: quantize_(model, config). Modules not listed stay float. torchao",
        "# needs each layer's input size divisible by its group size.",
        "",
    ]
    return "\n".join(lines)


# -- all at once ------------------------------------------------------------------------------


def _readme(arch: str, args: list[str], warnings: dict[str, Warnings]) -> str:
    sections = [
        "# Exports of an smpq mixed-precision policy\n",
        "Each file carries the policy's per-layer *weight* formats to another toolkit, which",
        "re-quantizes from the float weights (it does not read smpq's codes or scales).",
        "Activation formats are not exported.\n",
        f"## llama_cpp_tensor_types.txt (llama.cpp, arch {arch})\n",
        "One `PATTERN=TYPE` per line, usable as `llama-quantize --tensor-type-file`; the same",
        "as repeated `--tensor-type` arguments. Patterns are anchored regexes on GGUF tensor",
        "names. Pass a quantized base type (overrides are ignored when the base type is f16):\n",
        "    llama-quantize --tensor-type-file llama_cpp_tensor_types.txt in.gguf out.gguf Q8_0\n",
        "Unlisted tensors get the base type's defaults. k-quants (q2_k..q6_k) need row lengths",
        "divisible by 256, q4_0/q4_1/q5_0/q5_1/q8_0/iq4_nl by 32; otherwise llama.cpp SILENTLY",
        "stores another type (q2_k/q3_k -> q4_0, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0).",
        "`smpq ptq --export gguf` refuses such plans; this file does not check shapes. Every",
        "GGUF type re-quantizes with its own block layout, so only GGUF candidate formats (fmt",
        "q4_0, q2_k, ...) are exact; int specs map by bit width (int4 g32 -> q4_0/q4_1, int2 ->",
        "q2_k, int3 -> q3_k, ...; see docs/EXPORTS.md). Layers left float become f16.",
        "Command line form:\n",
        "    llama-quantize " + shlex.join(args[:4]) + " ... in.gguf out.gguf Q8_0\n",
        "## gptqmodel_dynamic.json (GPTQModel)\n",
        "The `dynamic` argument of GPTQModel's `QuantizeConfig`: `+:^name$` sets bits /",
        "group_size / sym for that module, `-:^name$` leaves it in float. GPTQ has 2/3/4/8 bits;",
        "other widths are rounded up. Modules not in the policy get the base config.\n",
        "## torchao_config.py / torchao_config.json (torchao)\n",
        "Paste the snippet, then `quantize_(model, config, filter_fn=None)` (torchao >= 0.15).",
        "Asymmetric integer specs map to `IntxWeightOnlyConfig` with smpq's exact grid;",
        "symmetric ones are approximate (torchao's symmetric scale is amax / ((qmax - qmin) / 2),",
        "smpq's amax / qmax), `Int4WeightOnlyConfig` also has no CPU path in torchao 0.18. Each",
        "layer's input size must be a multiple of its group size. The JSON lists the same configs",
        "as data.\n",
        "## hf_quantization_config.json (Hugging Face config.json)\n",
        "A `quantization_config` block for a GPTQ checkpoint produced with these formats: base",
        "bits / group_size / sym are the most common ones, `dynamic` pins each layer (read by",
        "GPTQModel and vLLM; transformers' GPTQConfig keeps only the base fields). Its",
        "approximations are GPTQModel's below.\n",
        "## Approximate mappings and skipped layers\n",
    ]
    targets_of: dict[str, list[str]] = {}
    for target, ws in warnings.items():
        for w in ws:
            targets_of.setdefault(w, []).append(target)
    notes = [f"- {w} ({', '.join(ts)})" for w, ts in targets_of.items()]
    none = ["None beyond the notes above: each layer maps to a format of its bit width."]
    return "\n".join(sections + (notes or none)) + "\n"


def write_exports(
    out_dir: str | os.PathLike, policy: Policy, arch: str = "llama"
) -> dict[str, Path]:
    """Write every translation of `policy` plus EXPORTS.md to `out_dir`; returns the paths."""
    _arch_map(arch)
    out = Path(out_dir)
    args, w_cpp = llama_cpp_tensor_types(policy, arch)
    dynamic, w_gptq = gptq_dynamic(policy)
    configs, w_ao = torchao_configs(policy)
    texts = {
        "llama_cpp": ("llama_cpp_tensor_types.txt", "\n".join(args[1::2]) + "\n"),
        "gptqmodel": ("gptqmodel_dynamic.json", json.dumps(dynamic, indent=2) + "\n"),
        "torchao": ("torchao_config.py", torchao_snippet(configs)),
        "torchao_json": ("torchao_config.json", json.dumps(configs, indent=2) + "\n"),
    }
    warnings = {"llama.cpp": w_cpp, "GPTQModel": w_gptq, "torchao": w_ao}
    if any(_weight(policy, n) is not None for n in policy.layers):
        hf, _ = hf_quantization_config(policy)
        texts["hf"] = ("hf_quantization_config.json", json.dumps(hf, indent=2) + "\n")
    texts["readme"] = ("EXPORTS.md", _readme(arch, args, warnings))
    paths = {}
    for key, (fname, text) in texts.items():
        atomic_write_text(out / fname, text)
        paths[key] = out / fname
    return paths
