"""A tiny Llama-architecture causal LM the project trains itself, with a byte tokenizer.

Why: a real (trained, not random) causal LM with no download, small enough that allocation
methods can be compared against exhaustive oracles on 2 CPU cores. The tokenizer is UTF-8
bytes (ids 0..255) plus <bos>, <eos>, <pad>, so any text round-trips with no vocabulary file.

Trained models are cached under <cache_dir>/lm/<key>/ where key hashes the config, the
training texts' content and TINY_LM_VERSION: a cached copy is never retrained. The folder is a
standard Hugging Face folder (config.json + model.safetensors) plus tokenizer_spec.json and
meta.json (written last; its presence marks a complete entry). Load it with
`smpq.transformer.load_local(folder)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smpq.errors import SmpqError
from smpq.fileio import atomic_write_text, publish_dir

__all__ = [
    "META_FILE",
    "TINY_LM_VERSION",
    "TOKENIZER_FILE",
    "ByteTokenizer",
    "TinyLMConfig",
    "build_tiny_lm",
    "default_tiny_lm",
    "tiny_lm_key",
    "train_tiny_lm",
]

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer_spec.json"
META_FILE = "meta.json"
# Part of every cache key: bump when the model, tokenizer or training loop changes.
TINY_LM_VERSION = "smpq-tinylm-1"

Progress = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then <bos>=256, <eos>=257, <pad>=258 (vocab 259)."""

    kind: str = "smpq-byte"
    version: int = 1

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode_array(self, text: str) -> np.ndarray:
        """Byte ids as int64 without a Python list: fast for megabytes of text."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.encode_array(text).tolist()
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of the byte ids; specials are dropped, broken UTF-8 becomes U+FFFD."""
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(int(i) for i in seq if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "version": self.version,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ByteTokenizer:
        path = Path(folder) / TOKENIZER_FILE
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SmpqError(f"unreadable tokenizer spec {path}: {exc}") from None
        if not isinstance(spec, dict) or spec != cls().to_dict():
            raise SmpqError(f"{path} is not an smpq byte tokenizer spec (v1)")
        return cls()


_POSITIVE_INTS = (
    "hidden",
    "layers",
    "heads",
    "intermediate",
    "context",
    "steps",
    "batch_size",
    "warmup",
)


@dataclass(frozen=True)
class TinyLMConfig:
    """Model shape and training schedule (defaults: 858k parameters, 3.07M training tokens).

    Cost: one step of 16 x 128 tokens is ~0.3 s on one free CPU core, so the default 1500
    steps take ~7 min single-threaded (measured: 590 s with 1 thread on a 2-core machine
    busy with other jobs); held-out perplexity 3.72 per byte on the stdlib test split.

    AdamW (betas 0.9/0.95, decay only on >= 2-D weights), linear warmup then cosine decay to
    min_lr_ratio * lr, gradient clipping. Each step draws batch_size random windows of
    `context` tokens from the concatenated training stream (documents joined by <eos>).
    """

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 344
    context: int = 128
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SmpqError(f"{name} must be an integer >= 1, got {v!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise SmpqError("hidden / heads must be an even integer (rotary embeddings)")
        for name, ok, rule in (
            ("lr", lambda v: v > 0, "> 0"),
            ("grad_clip", lambda v: v > 0, "> 0"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise SmpqError(f"{name} must be a finite number {rule}, got {v!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SmpqError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SmpqError(f"seed must be an integer >= 0, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyLMConfig:
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise SmpqError(f"unknown field(s) in tiny LM config: {sorted(extra)}")
        return cls(**d)


def build_tiny_lm(cfg: TinyLMConfig, seed: int | None = None) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of cfg's shape (untied head, byte vocab)."""
    from smpq.transformer.models import require_transformers

    tf = require_transformers()
    tok = ByteTokenizer()
    config = tf.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        model = tf.LlamaForCausalLM(config)
    return model.float()


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tiny_lm_key(cfg: TinyLMConfig, texts: Sequence[str]) -> str:
    """16 hex digits of sha256 over config, tokenizer, training texts and TINY_LM_VERSION."""
    payload = {
        "config": cfg.to_dict(),
        "tokenizer": ByteTokenizer().to_dict(),
        "texts": _texts_digest(texts),
        "code": TINY_LM_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _token_stream(texts: Sequence[str], tok: ByteTokenizer) -> torch.Tensor:
    """All texts' byte ids joined by <eos>, as one int16 tensor (ids < 2^15)."""
    eos = np.array([tok.eos_token_id], dtype=np.int64)
    parts = [p for t in texts for p in (tok.encode_array(t), eos)]
    return torch.from_numpy(np.concatenate(parts).astype(np.int16)) if parts else torch.empty(0)


def _lr_at(step: int, cfg: TinyLMConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _train_loop(
    model: nn.Module, stream: torch.Tensor, cfg: TinyLMConfig, progress: Progress | None
) -> list[dict]:
    """Train in place; returns the mean loss of every logging interval (10 per run)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(cfg.context)
    every = max(1, cfg.steps // 10)
    history: list[dict] = []
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        starts = torch.randint(0, len(stream) - cfg.context + 1, (cfg.batch_size, 1), generator=gen)
        x = stream[starts + offsets].long()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        if not torch.isfinite(loss):
            raise SmpqError("tiny LM training diverged (non-finite loss); lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            entry = {
                "step": step + 1,
                "loss": sum(losses) / len(losses),
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
            history.append(entry)
            losses = []
            log.info("tiny LM step %d/%d loss %.4f", step + 1, cfg.steps, entry["loss"])
            if progress is not None:
                progress(step + 1, cfg.steps, entry)
    model.eval()
    return history


def _heldout(model: nn.Module, texts: Sequence[str], cfg: TinyLMConfig) -> dict[str, Any]:
    from smpq.transformer.data import token_blocks
    from smpq.transformer.values import nll

    blocks = token_blocks(texts, ByteTokenizer(), block=cfg.context, n_blocks=256)
    loss = nll(model, blocks)
    return {
        "heldout_nll": loss,
        "heldout_perplexity": math.exp(loss),
        "heldout_blocks": len(blocks),
    }


def train_tiny_lm(
    cfg: TinyLMConfig,
    texts: Sequence[str],
    cache_dir: str | os.PathLike,
    heldout: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Folder of the tiny LM trained on `texts`, training only if no cached copy exists.

    `heldout` texts (not part of the key) give meta.json's heldout_nll / heldout_perplexity
    (per byte, up to 256 evenly spread blocks) when the model is trained. Training happens in
    a temp folder renamed into place, so concurrent runs never see a partial entry.
    """
    texts = list(texts)
    key = tiny_lm_key(cfg, texts)
    root = Path(cache_dir).expanduser() / "lm"
    final = root / key
    if (final / META_FILE).is_file():
        log.info("using cached tiny LM %s", final)
        return final
    tok = ByteTokenizer()
    stream = _token_stream(texts, tok)
    if len(stream) < cfg.context:
        raise SmpqError(
            f"training texts give {len(stream)} tokens, fewer than one context of {cfg.context}"
        )
    model = build_tiny_lm(cfg)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        history = _train_loop(model, stream, cfg, progress)
    seconds = time.perf_counter() - start
    meta: dict[str, Any] = {
        "cache_key": key,
        "code_version": TINY_LM_VERSION,
        "config": cfg.to_dict(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens_available": len(stream),
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.context,
        "train_seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    if heldout:
        meta |= _heldout(model, heldout, cfg)
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)  # debris without meta.json: entries only appear via rename
    with publish_dir(final, META_FILE) as tmp:  # another run finishing first keeps its copy
        model.save_pretrained(str(tmp))
        tok.save(tmp)
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    log.info("trained tiny LM %s in %.1fs", final, seconds)
    return final


def default_tiny_lm(
    cache_dir: str | os.PathLike,
    cfg: TinyLMConfig = TinyLMConfig(),
    progress: Progress | None = None,
) -> Path:
    """The project's tiny LM: trained on the stdlib "train" split, held out on "test"."""
    from smpq.transformer.data import stdlib_corpus

    corpus = stdlib_corpus()
    return train_tiny_lm(cfg, corpus["train"], cache_dir, heldout=corpus["test"], progress=progress)
