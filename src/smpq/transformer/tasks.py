"""Transformer value tasks for `smpq.evaluator`: each worker holds one prepared PTQSession.

A row is one candidate level per share group (`PTQSession.groups`), the progressive game's
assignment; its value is `PTQSession.value(split)` with those candidate weights swapped in
(-KL to the float model for causal LMs). `build(device)` loads the model and the candidate
cache once per worker: run `prepare()` once on the driver with the same settings first, so
the workers read the quantized candidates from the shared content-keyed cache
(`<settings.cache_dir>/candidates/`) instead of recomputing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from smpq.evaluator import ValueFn
from smpq.transformer.scores import DEFAULT_CANDIDATES
from smpq.transformer.session import PTQSession, RunSettings

__all__ = ["SessionTask", "to_device"]


@dataclass(frozen=True)
class SessionTask:
    """Values of group-level rows on a transformer (a model name or a local folder)."""

    model: str
    out: str | None = None
    backend: str = "rtn"
    candidates: str | list = DEFAULT_CANDIDATES
    settings: RunSettings = dataclasses.field(default_factory=RunSettings)
    split: str = "calib"
    threads: int = 1

    def session(self, device: str = "cpu") -> PTQSession:
        torch.set_num_threads(self.threads)
        s = PTQSession(self.model, self.backend, self.candidates, self.settings,
                       out=self.out).prepare()
        if device != "cpu":
            to_device(s, device)
        return s

    def build(self, device: str = "cpu") -> ValueFn:
        s = self.session(device)
        keys, groups, split = s.candidates.keys, s.groups, self.split

        def value(rows: np.ndarray) -> np.ndarray:
            out = np.empty(len(rows))
            for r, row in enumerate(np.asarray(rows, dtype=np.int64)):
                s.swapper.set({n: keys[int(k)] for g, k in zip(groups, row, strict=True)
                               for n in g})
                out[r] = s.value(split)
            s.swapper.restore()
            return out

        return value


def to_device(s: PTQSession, device: str) -> PTQSession:
    """Move a prepared causal-LM session (model, candidate weights, references) to `device`."""
    from smpq.transformer.values import WeightSwapper

    s.swapper.restore()
    s.model.to(device)
    s.swapper = WeightSwapper(s.model, s.candidates.loaders())  # read onto the model's device
    s.refs = {k: dataclasses.replace(r, blocks=r.blocks.to(device), logp=r.logp.to(device),
                                     index=None if r.index is None else r.index.to(device))
              for k, r in s.refs.items()}
    return s
