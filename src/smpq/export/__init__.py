"""Exports of quantized models: packed safetensors checkpoints and other toolkits' formats.

`QuantizedTensor` is the exchange type (codes + scales of one weight, from RTN or recovered
from any fake-quantized weight and its scales); `save_quantized` / `load_quantized` store and
restore a model; `write_exports` translates a Policy for llama.cpp, GPTQModel, torchao and
Hugging Face configs.
"""

from smpq.export.packing import (
    QuantizedTensor,
    decode_minifloat,
    encode_minifloat,
    minifloat_codebook,
    pack,
    packed_length,
    unpack,
)
from smpq.export.safetensors_io import (
    FORMAT_VERSION,
    SCALE_DTYPES,
    load_quantized,
    save_quantized,
)
from smpq.export.targets import (
    GGUF_NAME_MAPS,
    gguf_name,
    gguf_type,
    gptq_dynamic,
    hf_quantization_config,
    llama_cpp_tensor_types,
    parse_tensor_type_args,
    torchao_configs,
    torchao_snippet,
    write_exports,
)

__all__ = [
    "FORMAT_VERSION",
    "GGUF_NAME_MAPS",
    "QuantizedTensor",
    "SCALE_DTYPES",
    "decode_minifloat",
    "encode_minifloat",
    "gguf_name",
    "gguf_type",
    "gptq_dynamic",
    "hf_quantization_config",
    "llama_cpp_tensor_types",
    "load_quantized",
    "minifloat_codebook",
    "pack",
    "packed_length",
    "parse_tensor_type_args",
    "save_quantized",
    "torchao_configs",
    "torchao_snippet",
    "unpack",
    "write_exports",
]
