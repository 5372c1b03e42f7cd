"""What a transformer PTQ session reads: the model (by name or folder), its quantizable linear
layers and their costs, and its text (causal-LM token blocks, encoder pairs).

Split from `smpq.transformer.run` (the session and the job) to keep each under ~600 lines.
`lm_blocks` reads a `RunSettings` (block, split sizes, text source, calib_text).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from smpq.cost import Budget, ModelCost
from smpq.errors import SmpqError
from smpq.transformer.mixed import parse_candidates

__all__ = ["check_architecture", "check_budget_early", "encode_pairs", "lm_blocks",
           "load_model", "model_cost"]

log = logging.getLogger("smpq.transformer.run")


def model_cost(model: torch.nn.Module, embeddings: bool = False
               ) -> tuple[dict[str, torch.nn.Module], ModelCost]:
    """The linear layers smpq quantizes and their costs (the rest counts as float params).

    embeddings=True adds the token embedding (first) and the output layer (last) as units, as
    GGUF stores them (`token_embd`, `output`); a tied output layer shares the embedding's one
    tensor, so it is that unit, not a second one. The embedding's MACs count only when tied
    (the output matmul); a lookup has none."""
    from smpq.cost import LayerCost
    from smpq.transformer.models import linear_layers

    linears = linear_layers(model)
    emb = tail = None
    if embeddings:
        names = {id(m): n for n, m in model.named_modules()}
        inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
        if inp is None or id(inp) not in names:
            raise SmpqError("this model has no token embedding to quantize")
        emb = names[id(inp)]
        if outp is not None and outp.weight is not inp.weight and id(outp) in names:
            tail = names[id(outp)]
        linears = {emb: inp, **linears, **({tail: outp} if tail else {})}
    quant = {id(p) for m in linears.values() for p in (m.weight, getattr(m, "bias", None))
             if p is not None}
    other = sum(p.numel() for p in model.parameters() if id(p) not in quant)
    cost = ModelCost.from_linears(linears, other_params=other)
    if emb is not None and tail is not None:  # untied: the lookup does no multiply-adds
        lc = cost.layers[emb]
        cost.layers[emb] = LayerCost(lc.name, lc.kind, lc.weight_shape, lc.params, lc.bias, 0)
    return linears, cost


def check_budget_early(model: str, budget: Budget, candidates: str | list) -> None:
    """An impossible budget on the tiny LM fails before it is trained (minutes on a CPU): its
    layer shapes come from the config, through an untrained model of the same shape."""
    if model != "tiny-lm":  # other models load without training; PTQSession.resolve checks
        return
    from smpq.spec import LayerChoice
    from smpq.transformer.tiny_lm import TinyLMConfig, build_tiny_lm

    linears, cost = model_cost(build_tiny_lm(TinyLMConfig()))
    specs = parse_candidates(candidates)
    budget.resolve(cost, {n: [LayerChoice(s, None) for s in specs] for n in linears})


def check_architecture(folder: Path) -> None:
    """One line, before any weight is read, for a config transformers cannot build."""
    from smpq.transformer.models import require_transformers

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return  # load_local names the missing config.json
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return  # load_local reports an unreadable config
    known = require_transformers().CONFIG_MAPPING
    if model_type is None or model_type not in known:
        raise SmpqError(f"unsupported architecture {model_type!r} in {folder / 'config.json'}: "
                        "this transformers version cannot build it (smpq quantizes Llama-style "
                        "decoders such as llama/mistral/qwen2 and BERT-style encoders)")


def load_model(model: str, cache_dir: str) -> tuple[torch.nn.Module, Any, str]:
    from smpq.transformer.models import load_local, resolve_model

    folder, kind = resolve_model(model, cache_dir)
    check_architecture(folder)
    m, tok = load_local(folder, kind)
    if tok is None:
        raise SmpqError(f"model {model!r} has no tokenizer files; smpq needs one for its data")
    causal = type(m).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return m, tok, "causal_lm" if causal else "encoder"


def lm_blocks(tok: Any, s: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """{split: token blocks} of a causal LM and where they came from (module docstring)."""
    from smpq.transformer.data import stdlib_corpus, token_blocks
    from smpq.transformer.tiny_lm import ByteTokenizer

    sizes = {"calibration": s.n_calib_blocks, "validation": s.val_blocks,
             "test": s.test_blocks}
    source, note = s.text, None
    if source == "auto":
        source = "stdlib"
        if not isinstance(tok, ByteTokenizer):
            from smpq.transformer.wiki import GENSIM_INSTALL, wiki_source

            try:
                wiki_source()
                source = "wikipedia"
            except SmpqError:
                note = (f"Wikipedia text needs gensim's test data ({GENSIM_INSTALL}); "
                        "using the Python stdlib split")
    if source == "wikipedia":
        from smpq.transformer.wiki import wiki_blocks

        blocks = {k: wiki_blocks(tok, k, s.block, n) for k, n in sizes.items()}
        if getattr(s, "calib_seed", None) is not None:  # other calibration blocks, same split
            blocks["calibration"] = wiki_blocks(tok, "calibration", s.block,
                                                sizes["calibration"], seed=s.calib_seed)
    else:
        corpus = stdlib_corpus()
        blocks = {k: token_blocks(corpus[k], tok, s.block, n) for k, n in sizes.items()}
    info = {"text": source, "calibration": source}
    if s.calib_text is not None:
        from smpq.transformer.wiki import calib_text_blocks

        blocks["calibration"] = calib_text_blocks(s.calib_text, tok,
                                                  s.n_calib_blocks * s.block, s.block)
        info["calibration"] = str(s.calib_text)
    if note:
        info["note"] = note
        log.warning(note)
    return blocks, info


def encode_pairs(tok: Any, task: Any, size: int, max_length: int) -> list[tuple[dict, dict]]:
    """(queries, documents) token batches of `size` pairs for the contrastive gradient loss."""

    def enc(texts: Any) -> dict:
        return dict(tok(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt"))

    n = len(task.queries)
    return [(enc(task.queries[i:i + size]), enc(task.documents[i:i + size]))
            for i in range(0, n, size)]
