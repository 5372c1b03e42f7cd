"""Float references cached beside the candidates, so a second `smpq ptq` runs no float forward.

The float model's outputs on the fixed texts (a causal LM's next-token log-probs per split,
an encoder's sentence embeddings) take minutes on an LLM and depend only on the model and the
text, not on the method, budget or output folder. Each lives in the shared content-keyed cache
`<cache_dir>/references/<key>.safetensors`:

    key = sha256(version, what, model digest (every parameter and buffer), digest of the
                 token blocks or texts, settings that change the numbers: batch size, top_k,
                 max_length)

written atomically (`smpq.fileio`), with a sha256 of its own tensors in the metadata. On read,
an entry whose checksum, shapes or inputs do not match (a truncated or edited file) is
recomputed and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smpq.fileio import atomic_save_safetensors

__all__ = ["REFERENCE_VERSION", "cached_embeddings", "lm_references", "reference_key",
           "tensor_digest"]

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' shapes, dtypes and raw bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_key(what: str, model_digest: str, inputs_digest: str, **settings: Any) -> str:
    """The content key of one cached reference (module docstring)."""
    blob = json.dumps([REFERENCE_VERSION, what, model_digest, inputs_digest, settings],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "references" / f"{key}.safetensors"


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """(tensors, metadata) of an entry whose checksum matches; None if absent or corrupt."""
    if not path.is_file():
        return None
    try:
        import safetensors
        from safetensors.torch import load_file

        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
        names = sorted(tensors)
        if meta.get("checksum") != tensor_digest(*(tensors[n] for n in names)):
            raise ValueError("checksum mismatch")
        return tensors, meta
    except Exception as exc:  # truncated, edited or not a safetensors file: recompute it
        log.warning("float reference cache entry %s is unreadable (%s); recomputing it",
                    path, exc)
        return None


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    checksum = tensor_digest(*(tensors[n] for n in sorted(tensors)))
    try:
        atomic_save_safetensors(tensors, path, metadata={**meta, "checksum": checksum})
    except OSError as exc:  # a read-only cache costs time, not the run
        log.warning("could not cache a float reference in %s: %s", path.parent, exc)


def _lm_entry(blocks: Tensor, got: tuple[dict[str, Tensor], dict[str, str]] | None,
              batch_size: int) -> Any:
    """The FloatReference of a cache entry, or None when it does not fit `blocks`."""
    from smpq.transformer.values import FloatReference

    if got is None:
        return None
    t, meta = got
    try:
        logp, index, nll = t["logp"], t.get("index"), float(meta["nll"])
        ok = (torch.equal(t["blocks"], blocks) and logp.shape[:2] == blocks.shape
              and logp.dtype == torch.float32 and math.isfinite(nll)
              and (index is None or index.shape == logp.shape))
    except (KeyError, ValueError, RuntimeError):
        ok = False
    if not ok:
        log.warning("a float reference cache entry does not match its text; recomputing it")
        return None
    return FloatReference(blocks=blocks, logp=logp, index=index, batch_size=batch_size, nll=nll)


def lm_references(model: nn.Module, splits: Mapping[str, Tensor], batch_size: int,
                  cache_dir: str | Path | None, model_digest: str,
                  progress: Callable[[str, int, int], None] | None = None,
                  ) -> tuple[dict[str, Any], int]:
    """({split: FloatReference}, how many were computed): each read from the cache when a
    valid entry exists, else computed with `values.float_reference` and cached."""
    from smpq.transformer import values

    refs, computed = {}, 0
    tick = progress or (lambda stage, done, total: None)
    for i, (name, blocks) in enumerate(splits.items()):
        tick("float references", i, len(splits))
        key = reference_key("lm_logp", model_digest, tensor_digest(blocks),
                            batch_size=batch_size, top_k="auto")
        path = None if cache_dir is None else _path(cache_dir, key)
        ref = None if path is None else _lm_entry(blocks, _read(path), batch_size)
        if ref is None:
            ref = values.float_reference(model, blocks, batch_size=batch_size)
            computed += 1
            if path is not None:
                t = {"blocks": ref.blocks, "logp": ref.logp}
                if ref.index is not None:
                    t["index"] = ref.index
                _write(path, t, {"nll": repr(ref.nll), "split": name})
        refs[name] = ref
    tick("float references", len(splits), len(splits))
    return refs, computed


def cached_embeddings(model: nn.Module, enc: Any, texts: Sequence[str], max_length: int,
                      cache_dir: str | Path | None, model_digest: str) -> tuple[Tensor, bool]:
    """(the float model's `values.embed(model, enc)`, whether it was computed): an encoder's
    reference embeddings of `texts` (tokenized as `enc`), cached like the LM references."""
    from smpq.transformer import values

    texts_digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    key = reference_key("embeddings", model_digest, texts_digest, max_length=max_length,
                        batch_size=len(enc.batches[0]["input_ids"]) if enc.batches else 0)
    path = None if cache_dir is None else _path(cache_dir, key)
    got = None if path is None else _read(path)
    if got is not None:
        emb = got[0].get("embeddings")
        if emb is not None and emb.dim() == 2 and emb.shape[0] == enc.n:
            return emb, False
        log.warning("a float reference cache entry does not match its texts; recomputing it")
    emb = values.embed(model, enc)
    if path is not None:
        _write(path, {"embeddings": emb}, {"texts": str(len(texts))})
    return emb, True


def encoder_references(model: nn.Module, tokenizer: Any, tasks: Mapping[str, Any],
                       max_length: int, cache_dir: str | Path | None, model_digest: str,
                       progress: Callable[[str, int, int], None] | None = None,
                       ) -> tuple[dict[str, Any], Any, int]:
    """({split: EncoderReference}, the test split's RetrievalReference, how many embedding
    sets were computed) of an encoder, as `values.encoder_reference` and
    `values.retrieval_reference` build them, each embedding set cached."""
    from smpq.transformer import values

    tick = progress or (lambda stage, done, total: None)
    computed = 0

    def embedded(texts: Sequence[str]) -> tuple[Any, Tensor]:
        nonlocal computed
        enc = values.encode_texts(tokenizer, texts, max_length)
        emb, fresh = cached_embeddings(model, enc, list(texts), max_length, cache_dir,
                                       model_digest)
        computed += int(fresh)
        return enc, emb

    refs, steps = {}, len(tasks) + 1
    for i, (name, task) in enumerate(tasks.items()):
        tick("float references", i, steps)
        refs[name] = values.EncoderReference(*embedded(task.texts))
    tick("float references", len(tasks), steps)
    test = tasks["test"]
    (q, eq), (d, ed) = embedded(test.queries), embedded(test.documents)
    tick("float references", steps, steps)
    return refs, values.RetrievalReference(q, d, eq @ ed.T), computed
