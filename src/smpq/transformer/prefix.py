"""Prefix reuse: a policy's forward starts at the first transformer block it changes.

Why: whole-policy searches (shapley-loop, random, local, evolution) evaluate policies that
differ from ones already measured in a few units. The hidden states entering block k depend
only on the weights upstream of it (the token embedding and blocks 0..k-1), so a policy
whose upstream assignment equals a measured one's can start its forward at block k from
that policy's cached hidden states: a change in block k costs (L - k) / L of a forward.

How (exact by construction): `PrefixForward.logits` looks up, deepest first, the hidden
states entering block k (k = L: entering the final norm) keyed by (tag, k, the candidate
keys of every layer upstream of k); `tag` names the token blocks that were run (split and
rows). From k = 0 it calls the Hugging Face model as usual; from k > 0 it calls the same
model with `inputs_embeds` = the cached hidden states on a temporarily truncated layer list
(`layers[k:]`, put back in `finally`). For Llama-style models (`PREFIX_MODEL_TYPES`) the
model's forward feeds `inputs_embeds` straight into the first layer it holds, with the same
position ids (0..T-1), rotary tables and causal mask as a full forward, and each decoder
layer reads no state of the layers before it (no KV cache is used), so the remaining layers
compute exactly what they compute in a full forward. This is simpler and more robust across
transformers versions than re-implementing the decoder loop (mask and rotary helpers change
signatures between releases). Forward pre-hooks on the remaining layers and on the final
norm record the hidden states entering them for later policies. Models of other types
(Gemma scales its embeddings inside the forward, encoders have no causal prefix) fall back
to a full forward, counted as one.

Units: the token embedding is upstream of everything (a tied output layer shares its
weight, so it is too), a block's linears are upstream of the blocks after it, an untied
output layer (`lm_head`) is downstream of every cached state (its change reruns only the
final norm and the head, 0 block-tokens); a layer smpq cannot place counts as upstream of
everything (never wrong, only slower). The cache assumes weights change only through the
session's `WeightSwapper`, whose assignment is the key.

Cache: an LRU bounded in bytes (DEFAULT_CACHE_MB, configurable; 0 turns caching off),
hidden states stored in the model's dtype on the model's device. A hit also refreshes the
entries upstream of it (the same reference policy), so a reference policy that many moves
branch from stays cached. Entries are shared by policies with equal upstream assignments,
so a forward from block k stores only the L - k states it computed.

Compute is counted in block-tokens: tokens x transformer blocks run (a full forward over N
tokens of an L-block model = N * L; a forward from block k: N * (L - k)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_CACHE_MB", "PREFIX_MODEL_TYPES", "HiddenCache", "PrefixForward",
           "batch_tokens", "split_value", "transformer_blocks"]

DEFAULT_CACHE_MB = 512
# model_type values whose forward takes inputs_embeds unchanged into the first decoder layer
PREFIX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def transformer_blocks(model: nn.Module) -> int:
    """Number of transformer blocks (config.num_hidden_layers; 1 when the model says none,
    so a plain logits module counts its forward as one block)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return int(n) if isinstance(n, int) and n > 0 else 1


def batch_tokens(batch: Any) -> int:
    """Tokens a forward over `batch` runs: a (B, T) id tensor, a tokenizer dict (its padded
    input_ids), or a tuple/list of those (e.g. contrastive query/document pairs)."""
    if isinstance(batch, Tensor):
        return int(batch.numel())
    if isinstance(batch, Mapping):
        return int(batch["input_ids"].numel())
    if isinstance(batch, (tuple, list)):
        return sum(batch_tokens(b) for b in batch)
    raise TypeError(f"cannot count the tokens of a {type(batch).__name__}")


class HiddenCache:
    """Tensors keyed by hashables, least recently used evicted first, at most `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._d: OrderedDict[Hashable, Tensor] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable) -> Tensor | None:
        t = self._d.get(key)
        if t is not None:
            self._d.move_to_end(key)
        return t

    def put(self, key: Hashable, t: Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._d[key] = t
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, gone = self._d.popitem(last=False)
            self.bytes -= gone.numel() * gone.element_size()

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0


def _decoder(model: nn.Module) -> nn.Module | None:
    """The inner decoder (model.model for *ForCausalLM) when it has layers, an embedding
    and a final norm, else None."""
    base = getattr(model, "model", None)
    ok = (isinstance(getattr(base, "layers", None), nn.ModuleList)
          and isinstance(getattr(base, "norm", None), nn.Module)
          and isinstance(getattr(base, "embed_tokens", None), nn.Module))
    return base if ok else None


class PrefixForward:
    """Logits of a causal LM under the current weights, from the deepest cached block.

    `layers`: the names of every swappable layer (the assignment's keys). `supported` is
    False for models that fall back to a full forward (module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[str],
                 cache_bytes: int = DEFAULT_CACHE_MB << 20) -> None:
        self.model, self.n_blocks = model, transformer_blocks(model)
        base = _decoder(model)
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        self.supported = base is not None and mtype in PREFIX_MODEL_TYPES and \
            len(base.layers) == self.n_blocks
        self.base = base
        self.cache = HiddenCache(cache_bytes if self.supported else 0)
        self.depth = self._depths(layers) if self.supported else {}
        order = sorted(self.depth, key=lambda n: (self.depth[n], n))
        self._order = order
        # entry k (hidden states entering block k) depends on the first _upto[k] layers
        self._upto = [sum(1 for n in order if self.depth[n] <= k)
                      for k in range(self.n_blocks + 1)]
        self.hits = self.misses = 0

    def _depths(self, layers: Sequence[str]) -> dict[str, int]:
        """Layer name -> the first cached depth it affects: 0 embedding (and anything
        unplaced), i + 1 for block i, L + 1 for an untied output layer."""
        names = {id(m): n for n, m in self.model.named_modules()}
        prefix = names[id(self.base.layers)] + "."
        head = self.model.get_output_embeddings() if hasattr(
            self.model, "get_output_embeddings") else None
        emb = self.base.embed_tokens
        tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)
        head_name = names.get(id(head)) if head is not None and not tied else None
        out = {}
        for n in layers:
            rest = n[len(prefix):] if n.startswith(prefix) else ""
            idx = rest.split(".", 1)[0]
            if idx.isdigit() and int(idx) < self.n_blocks:
                out[n] = int(idx) + 1
            elif head_name is not None and n == head_name:
                out[n] = self.n_blocks + 1
            else:
                out[n] = 0
        return out

    def _keys(self, assignment: Mapping[str, Hashable | None]) -> list[tuple]:
        vals = tuple(assignment.get(n) for n in self._order)
        return [vals[:u] for u in self._upto]

    @torch.no_grad()
    def logits(self, ids: Tensor, tag: Hashable, assignment: Mapping[str, Hashable | None]
               ) -> tuple[Tensor, int]:
        """(float32 logits (B, T, V) of `ids` under the model's current weights, which
        must be `assignment`; the number of transformer blocks run). `tag` names the rows
        `ids` are (the same tag must always mean the same tokens)."""
        from smpq.transformer.values import lm_logits

        if not self.supported or self.cache.max_bytes == 0:
            return lm_logits(self.model, ids), self.n_blocks
        keys, L = self._keys(assignment), self.n_blocks
        start, h = 0, None
        for k in range(L, 0, -1):
            h = self.cache.get((tag, k, keys[k]))
            if h is not None:
                start = k
                break
        if h is None:
            self.misses += 1
        else:
            self.hits += 1
            for j in range(1, start):  # the reference's shallower states stay fresh too
                self.cache.get((tag, j, keys[j]))
            self.cache.get((tag, start, keys[start]))
        seen: dict[int, Tensor] = {}
        hooks = [self._hook(self.base.layers[j], j, seen) for j in range(start + 1, L)]
        if start < L:
            hooks.append(self._hook(self.base.norm, L, seen))
        try:
            if start == 0:
                out = self.model(input_ids=ids, use_cache=False)
            else:
                out = self._from(start, h)
        finally:
            for hk in hooks:
                hk.remove()
        for j, t in seen.items():
            self.cache.put((tag, j, keys[j]), t)
        return out.logits.float(), L - start

    @staticmethod
    def _hook(module: nn.Module, j: int, seen: dict[int, Tensor]) -> Any:
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            seen[j] = x.detach().clone()

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def _from(self, start: int, h: Tensor) -> Any:
        """The model's own forward from block `start`, fed the hidden states entering it."""
        base, full = self.base, self.base.layers
        base.layers = nn.ModuleList(list(full)[start:])
        try:
            return self.model(inputs_embeds=h, use_cache=False)
        finally:
            base.layers = full


def split_value(runner: PrefixForward, ref: Any, split: str,
                assignment: Mapping[str, Hashable | None], n_blocks: int | None = None,
                metric: str = "neg_kl") -> tuple[float, int, int]:
    """(value, block-tokens run, block-tokens saved) of the model's current weights on the
    first `n_blocks` token blocks of a `FloatReference` (None: all): -KL to the float model
    as `kl_to_float` computes it (mean over positions, batches of ref.batch_size), or with
    metric "neg_nll" minus the mean next-token NLL as `values.nll` does."""
    from smpq.transformer.values import _kl_sum, _token_nll_sum

    n = len(ref.blocks) if n_blocks is None else n_blocks
    bs, total, count, run_bt, saved = ref.batch_size, 0.0, 0, 0, 0
    for i0 in range(0, n, bs):
        i1 = min(i0 + bs, n)
        ids = ref.blocks[i0:i1]
        logits, ran = runner.logits(ids, (split, i0, i1), assignment)
        if metric == "neg_nll":
            s, c = _token_nll_sum(logits, ids)
        else:
            index = ref.index[i0:i1] if ref.index is not None else None
            s, c = _kl_sum(ref.logp[i0:i1], index, logits), ids.numel()
        total, count = total + s, count + c
        run_bt += ids.numel() * ran
        saved += ids.numel() * (runner.n_blocks - ran)
    value = -total / count if metric == "neg_nll" else -max(0.0, total / count)
    return value, run_bt, saved
