"""Value functions for allocation: how far a (partly) quantized model is from its float self.

Causal LMs: `float_reference` runs the float model once over fixed token blocks and keeps its
next-token log-probs; `kl_to_float` is then one forward pass of the quantized model. Every
position of every block counts (N * T distributions); the mean is over positions.
Storage: with a vocabulary <= FULL_VOCAB_LIMIT (tiny byte LMs) the full log-softmax is kept
(float32), so the KL is exact. Larger vocabularies keep the float model's top_k=64 tokens:
KL is then that of the two distributions coarsened to {top-k tokens, "all others"}, a lower
bound on the true KL (data processing inequality) that is tight when the tail mass is small.

Encoders (all-MiniLM-L6-v2): sentence embeddings are the sentence-transformers recipe, mean
of the last hidden states over real tokens, then L2-normalised. `embedding_cosine` and
`retrieval_agreement` compare them with the float model's on fixed texts.

`WeightSwapper` swaps fake-quantized weights in and out by pointer, so one candidate
assignment costs one swap and one forward pass; weights given as functions (the candidate
cache) are read only while swapped in, plus a small LRU bounded in bytes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smpq.errors import SmpqError
from smpq.transformer.data import RetrievalTask

__all__ = [
    "DEFAULT_TOP_K",
    "FULL_VOCAB_LIMIT",
    "EncodedTexts",
    "EncoderReference",
    "FloatReference",
    "RetrievalReference",
    "WeightSwapper",
    "embed",
    "embedding_cosine",
    "encode_texts",
    "encoder_reference",
    "float_reference",
    "kl_and_nll",
    "kl_to_float",
    "lm_logits",
    "nll",
    "perplexity",
    "retrieval_agreement",
    "retrieval_reference",
    "retrieval_report",
]

FULL_VOCAB_LIMIT = 4096
DEFAULT_TOP_K = 64


def _uses_cache(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


def lm_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """(B, T, V) float32 logits of a HF causal LM (no KV cache) or a plain logits module."""
    out = model(input_ids=ids, use_cache=False) if _uses_cache(model) else model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def _check_blocks(blocks: Tensor, min_len: int = 1) -> None:
    if not isinstance(blocks, Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise SmpqError("token blocks must be a LongTensor of shape (N, block)")
    if blocks.shape[0] < 1 or blocks.shape[1] < min_len:
        raise SmpqError(f"need >= 1 block of >= {min_len} tokens, got {tuple(blocks.shape)}")


def _batches(blocks: Tensor, batch_size: int) -> Iterator[Tensor]:
    if batch_size < 1:
        raise SmpqError(f"batch_size must be >= 1, got {batch_size}")
    yield from blocks.split(batch_size)


@dataclass(frozen=True, eq=False)
class FloatReference:
    """The float model's next-token log-probs on fixed blocks (see module docstring)."""

    blocks: Tensor  # (N, T) int64
    logp: Tensor  # (N, T, K) float32 log-probs of the kept tokens (K = V when full)
    index: Tensor | None  # (N, T, K) int64 ids of the kept tokens; None = full vocabulary
    batch_size: int
    nll: float  # the float model's mean next-token NLL on the blocks (nats)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def _token_nll_sum(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """Summed next-token NLL, one sequence at a time: the (T, V) temporaries of one row, not
    of the batch (with a 49k vocabulary a batch of 8 x 128 is 200 MB per copy)."""
    total = 0.0
    for row, seq in zip(logits, ids, strict=True):
        total += float(F.cross_entropy(row[:-1], seq[1:], reduction="sum").double())
    return total, ids[:, 1:].numel()


@torch.no_grad()
def float_reference(
    model: nn.Module, blocks: Tensor, top_k: int | str | None = "auto", batch_size: int = 8
) -> FloatReference:
    """Cache the float model's log-probs on `blocks` once (model must be in float).

    top_k: "auto" = full vocabulary up to FULL_VOCAB_LIMIT tokens, else DEFAULT_TOP_K;
    None = always full; an int = keep that many (full if >= the vocabulary).
    """
    _check_blocks(blocks, min_len=2)
    logps, indices, nll_sum, count, k = [], [], 0.0, 0, None
    for ids in _batches(blocks, batch_size):
        logits = lm_logits(model, ids)
        vocab = logits.shape[-1]
        if k is None:
            if top_k == "auto":
                k = vocab if vocab <= FULL_VOCAB_LIMIT else DEFAULT_TOP_K
            elif top_k is None:
                k = vocab
            elif isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1:
                k = min(top_k, vocab)
            else:
                raise SmpqError(f"top_k must be 'auto', None or an integer >= 1, got {top_k!r}")
        s, n = _token_nll_sum(logits, ids)
        nll_sum, count = nll_sum + s, count + n
        logp = F.log_softmax(logits, dim=-1)
        if k < vocab:
            logp, idx = logp.topk(k, dim=-1)
            indices.append(idx)
        logps.append(logp)
    return FloatReference(
        blocks=blocks,
        logp=torch.cat(logps),
        index=torch.cat(indices) if indices else None,
        batch_size=batch_size,
        nll=nll_sum / count,
    )


def _kl_sum(logp: Tensor, index: Tensor | None, logits: Tensor) -> float:
    """Summed KL over (B, T) positions, one sequence at a time (see `_token_nll_sum`)."""
    return sum(_kl_row(logp[i], None if index is None else index[i], logits[i])
               for i in range(len(logits)))


def _kl_row(logp: Tensor, index: Tensor | None, logits: Tensor) -> float:
    logq = F.log_softmax(logits, dim=-1)
    if index is None:
        return float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
    logq = logq.gather(-1, index)
    p = logp.exp()
    head = (p * (logp - logq)).sum(-1, dtype=torch.float64)
    # Same ops on p and q, so identical inputs give an exactly zero tail term.
    p_tail = (1.0 - p.sum(-1, dtype=torch.float64)).clamp_min(0.0)
    q_tail = (1.0 - logq.exp().sum(-1, dtype=torch.float64)).clamp_min(1e-12)
    tail = torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail)
    return float((head + tail).sum())


@torch.no_grad()
def kl_to_float(model: nn.Module, ref: FloatReference) -> float:
    """Mean per-position KL(float || model) in nats; exactly 0 for the float model itself."""
    total, n = 0.0, 0
    for i, ids in enumerate(_batches(ref.blocks, ref.batch_size)):
        sl = slice(i * ref.batch_size, i * ref.batch_size + len(ids))
        index = ref.index[sl] if ref.index is not None else None
        total += _kl_sum(ref.logp[sl], index, lm_logits(model, ids))
        n += ids.numel()
    return max(0.0, total / n)


@torch.no_grad()
def kl_and_nll(model: nn.Module, ref: FloatReference) -> tuple[float, float]:
    """(`kl_to_float(model, ref)`, `nll(model, ref.blocks)`) off one forward pass."""
    total, n, nll_sum, count = 0.0, 0, 0.0, 0
    for i, ids in enumerate(_batches(ref.blocks, ref.batch_size)):
        sl = slice(i * ref.batch_size, i * ref.batch_size + len(ids))
        index = ref.index[sl] if ref.index is not None else None
        logits = lm_logits(model, ids)
        total += _kl_sum(ref.logp[sl], index, logits)
        n += ids.numel()
        s, c = _token_nll_sum(logits, ids)
        nll_sum, count = nll_sum + s, count + c
    return max(0.0, total / n), nll_sum / count


@torch.no_grad()
def nll(model: nn.Module, blocks: Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over positions 1..T-1 of every block."""
    _check_blocks(blocks, min_len=2)
    total, n = 0.0, 0
    for ids in _batches(blocks, batch_size):
        s, c = _token_nll_sum(lm_logits(model, ids), ids)
        total, n = total + s, n + c
    return total / n


def perplexity(model: nn.Module, blocks: Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL): per token of the model's tokenizer (per byte for the tiny LM)."""
    return math.exp(nll(model, blocks, batch_size))


@dataclass(frozen=True, eq=False)
class EncodedTexts:
    """Tokenized texts, batched by length (less padding); `order[j]` = text of row j."""

    batches: tuple[dict[str, Tensor], ...]
    order: Tensor  # (N,) int64 original index of each row in batch order
    n: int


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int = 128, batch_size: int = 32
) -> EncodedTexts:
    """Tokenize once (truncating to max_length) so evaluations only run forward passes."""
    texts = list(texts)
    if not texts:
        raise SmpqError("need at least one text to embed")
    lengths = [len(tokenizer.encode(t, truncation=True, max_length=max_length)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = tuple(
        dict(
            tokenizer(
                [texts[i] for i in order[s : s + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for s in range(0, len(order), batch_size)
    )
    return EncodedTexts(batches=batches, order=torch.tensor(order), n=len(texts))


@torch.no_grad()
def embed(model: nn.Module, enc: EncodedTexts) -> Tensor:
    """(N, hidden) L2-normalised mean-pooled embeddings in the original text order."""
    rows = []
    for batch in enc.batches:
        out = model(**batch)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        rows.append(F.normalize(pooled, p=2, dim=-1))
    result = torch.empty(enc.n, rows[0].shape[-1])
    result[enc.order] = torch.cat(rows)
    return result


@dataclass(frozen=True, eq=False)
class EncoderReference:
    inputs: EncodedTexts
    embeddings: Tensor  # (N, hidden) float model, unit norm


def encoder_reference(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128
) -> EncoderReference:
    enc = encode_texts(tokenizer, texts, max_length)
    return EncoderReference(inputs=enc, embeddings=embed(model, enc))


def embedding_cosine(model: nn.Module, ref: EncoderReference) -> float:
    """Mean cosine between the model's and the float model's embedding of each text (<= 1)."""
    return float((embed(model, ref.inputs) * ref.embeddings).sum(-1).double().mean())


@dataclass(frozen=True, eq=False)
class RetrievalReference:
    queries: EncodedTexts
    documents: EncodedTexts
    scores: Tensor  # (Q, D) float model's cosine similarities; document i answers query i


def retrieval_reference(
    model: nn.Module, tokenizer: Any, task: RetrievalTask, max_length: int = 128
) -> RetrievalReference:
    q = encode_texts(tokenizer, task.queries, max_length)
    d = encode_texts(tokenizer, task.documents, max_length)
    return RetrievalReference(q, d, embed(model, q) @ embed(model, d).T)


def _ranks(x: Tensor) -> Tensor:
    return x.argsort(-1).argsort(-1).double()


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman correlation (ties broken by position; scores are continuous)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()


def _recall(scores: Tensor, k: int) -> float:
    top = scores.topk(k, dim=-1).indices
    truth = torch.arange(scores.shape[0]).unsqueeze(-1)
    return float((top == truth).any(-1).double().mean())


def retrieval_report(model: nn.Module, ref: RetrievalReference, k: int = 10) -> dict[str, float]:
    """Agreement with the float ranking plus task recall of both models.

    topk_overlap: mean |top-k(model) & top-k(float)| / k per query; spearman: mean per-query
    rank correlation of all document scores; recall_at_1/k: document i in query i's top-1/k.
    """
    n_docs = ref.scores.shape[1]
    if not isinstance(k, int) or not 1 <= k <= n_docs:
        raise SmpqError(f"k must be an integer in [1, {n_docs}], got {k!r}")
    scores = embed(model, ref.queries) @ embed(model, ref.documents).T
    top_m = scores.topk(k, dim=-1).indices
    top_f = ref.scores.topk(k, dim=-1).indices
    overlap = (top_m.unsqueeze(-1) == top_f.unsqueeze(-2)).any(-1).double().sum(-1) / k
    return {
        "topk_overlap": float(overlap.mean()),
        "spearman": float(_spearman(scores, ref.scores).mean()),
        "recall_at_1": _recall(scores, 1),
        "recall_at_k": _recall(scores, k),
        "float_recall_at_1": _recall(ref.scores, 1),
        "float_recall_at_k": _recall(ref.scores, k),
    }


def retrieval_agreement(
    model: nn.Module, ref: RetrievalReference, k: int = 10, metric: str = "spearman"
) -> float:
    """One number for an allocator: "spearman" or "topk_overlap" of `retrieval_report`."""
    if metric not in ("spearman", "topk_overlap"):
        raise SmpqError(f"metric must be 'spearman' or 'topk_overlap', got {metric!r}")
    return retrieval_report(model, ref, k)[metric]


class WeightSwapper:
    """Swap candidate weights into layers by pointer (`weight.data = t`), no copies.

    candidates: {layer name: {candidate key: weight tensor, or a zero-argument function giving
    it}}; keys are any hashable but None, which means "float". Tensors are checked and kept
    from the start (already matching the layer's dtype/device/shape they are used as-is:
    shared, not copied, so do not edit them in place; others are converted once here).
    Functions (e.g. `Candidates.loaders()`, reading the candidate cache) are called when their
    candidate is swapped in, so RAM holds only the weights in use plus an LRU of recently
    swapped-out ones of at most `cache_bytes` (default: an eighth of the swapped layers' float
    bytes). The float originals are kept, so `restore()` is bit-exact. Do not train or load a
    state dict while candidates are in: it would write into the candidate tensors.
    """

    def __init__(
        self, model: nn.Module,
        candidates: Mapping[str, Mapping[Hashable, Tensor | Callable[[], Tensor]]],
        cache_bytes: int | None = None,
    ) -> None:
        modules = dict(model.named_modules())
        self._params: dict[str, nn.Parameter] = {}
        self._float: dict[str, Tensor] = {}
        self._cands: dict[str, dict[Hashable, Tensor | Callable[[], Tensor]]] = {}
        for name, options in candidates.items():
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, nn.Parameter):
                raise SmpqError(f"no layer with a weight named {name!r} in the model")
            self._params[name] = weight
            self._float[name] = weight.data
            self._cands[name] = {k: t if callable(t) and not isinstance(t, Tensor)
                                 else self._prepare(name, k, t, weight)
                                 for k, t in options.items()}
        self._current: dict[str, Hashable | None] = dict.fromkeys(self._params)
        if cache_bytes is None:
            cache_bytes = sum(w.numel() * w.element_size() for w in self._float.values()) // 8
        self.cache_bytes = int(cache_bytes)
        self._lru: OrderedDict[tuple[str, Hashable], Tensor] = OrderedDict()
        self.loads = 0  # candidate weights read through a function so far

    @staticmethod
    def _prepare(name: str, key: Hashable, t: Tensor, weight: Tensor) -> Tensor:
        if key is None:
            raise SmpqError(f"layer {name!r}: candidate key None is reserved for float")
        if not isinstance(t, Tensor) or t.shape != weight.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise SmpqError(
                f"layer {name!r} candidate {key!r}: shape {shape} != {tuple(weight.shape)}"
            )
        return t.detach().to(device=weight.device, dtype=weight.dtype).contiguous()

    def _weight(self, name: str, key: Hashable) -> Tensor:
        """The tensor of (name, key): kept, cached, or read now through its function."""
        entry = self._cands[name][key]
        if isinstance(entry, Tensor):
            return entry
        t = self._lru.pop((name, key), None)
        if t is None:
            t = self._prepare(name, key, entry(), self._float[name])
            self.loads += 1
        return t

    def _release(self, name: str, key: Hashable, t: Tensor) -> None:
        """Keep a swapped-out read candidate in the LRU, within `cache_bytes`."""
        if isinstance(self._cands[name][key], Tensor):
            return
        self._lru[(name, key)] = t
        used = sum(x.numel() * x.element_size() for x in self._lru.values())
        while self._lru and used > self.cache_bytes:
            _, old = self._lru.popitem(last=False)
            used -= old.numel() * old.element_size()

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self._params)

    def options(self, name: str) -> tuple[Hashable, ...]:
        return tuple(self._cands[name])

    @property
    def assignment(self) -> dict[str, Hashable | None]:
        """The current candidate key of every layer (None = float)."""
        return dict(self._current)

    def set(self, assignment: Mapping[str, Hashable | None]) -> None:
        """Make the model match `assignment` exactly; layers not named go back to float."""
        unknown = set(assignment) - set(self._params)
        if unknown:
            raise SmpqError(f"unknown layer(s) in assignment: {sorted(unknown)}")
        for name, key in assignment.items():
            if key is not None and key not in self._cands[name]:
                raise SmpqError(f"layer {name!r} has no candidate {key!r}")
        for name, param in self._params.items():  # swap out first: the LRU may keep them
            key, was = assignment.get(name), self._current[name]
            if key != was and was is not None:
                self._release(name, was, param.data)
                param.data, self._current[name] = self._float[name], None
        for name, param in self._params.items():
            key = assignment.get(name)
            if key is not None and key != self._current[name]:
                param.data, self._current[name] = self._weight(name, key), key

    def update(self, changes: Mapping[str, Hashable | None]) -> None:
        """Change only the named layers; the others keep their current candidate."""
        self.set({**self._current, **changes})

    def restore(self) -> None:
        """Put every float weight back (bit-identical to before any swap)."""
        self.set({})

    @contextmanager
    def applied(self, assignment: Mapping[str, Hashable | None]) -> Iterator[WeightSwapper]:
        """Temporarily `set(assignment)`; the previous assignment is back on exit."""
        previous = self.assignment
        self.set(assignment)
        try:
            yield self
        finally:
            self.set(previous)
