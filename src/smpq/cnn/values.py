"""Value functions: a supernet configuration (player mask) -> a score on held-out data.

The Shapley engine calls these thousands of times, so the held-out set is stacked into
tensors once, and each call is a mask switch plus forward passes under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from smpq.cnn.supernet import Supernet
from smpq.errors import SmpqError

__all__ = ["VALUE_METRICS", "SubsetValue", "stack_dataset"]


def stack_dataset(ds: Dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of a map-style dataset as two tensors (the first `limit` items)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise SmpqError("the evaluation set is empty")
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(list(xs)), torch.as_tensor(np.asarray(ys), dtype=torch.long)


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _neg_loss(logits: Tensor, y: Tensor) -> float:
    return -float(F.cross_entropy(logits, y))


def _neg_kl(logits: Tensor, ref_logp: Tensor) -> float:
    """-KL(float || quantized), mean over samples; takes the float model's log-probabilities
    in place of labels. Smooth in the policy, unlike accuracy's one-image steps."""
    logq = F.log_softmax(logits, dim=1)
    return -float((ref_logp.exp() * (ref_logp - logq)).sum(dim=1).mean())


VALUE_METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "acc": _acc, "neg_loss": _neg_loss, "neg_kl": _neg_kl}


class SubsetValue:
    """v(S): the supernet's accuracy (or negative loss) with only the players in S active.

    Callable on a batch of boolean masks (k, n_players) -> (k,), the Shapley engine's
    interface. Counts forward passes and the seconds spent in them.
    """

    def __init__(self, net: Supernet, x: Tensor, y: Tensor, metric: str = "acc",
                 batch_size: int = 1024):
        if metric not in VALUE_METRICS:
            raise SmpqError(f"unknown value metric {metric!r}; known: {', '.join(VALUE_METRICS)}")
        self.net, self.x, self.y = net, x, y
        self.metric = VALUE_METRICS[metric]
        self.batch_size = batch_size
        self.calls = 0
        self.forward_seconds = 0.0

    @torch.no_grad()
    def score(self) -> float:
        """The score of the model as it is now switched."""
        import time

        model = self.net.model
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        logits = torch.cat([model(xb) for xb in self.x.split(self.batch_size)])
        self.forward_seconds += time.perf_counter() - t0
        model.train(was_training)
        self.calls += 1
        return self.metric(logits, self.y)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.atleast_2d(np.asarray(masks, dtype=bool))
        out = np.empty(len(masks))
        for k, m in enumerate(masks):
            self.net.set_mask(m)
            out[k] = self.score()
        self.net.set_all_active()
        return out


def policy_mask(net: Supernet, choices: dict[str, tuple[int, int]]) -> np.ndarray:
    """The player mask that activates exactly one (weight, activation) candidate per layer.

    `choices` maps each searched layer to (weight candidate index, activation index).
    """
    missing = [n for n in net.layers if n not in choices]
    if missing:
        raise SmpqError(f"no choice for layer(s): {', '.join(missing)}")
    mask = np.zeros(net.n_players, dtype=bool)
    index = {(p.layer, p.kind, p.index): k for k, p in enumerate(net.players)}
    for name, (wi, ai) in choices.items():
        mask[index[(name, "w", wi)]] = True
        mask[index[(name, "a", ai)]] = True
    return mask


class PolicyValue:
    """Post-training score of single policies through a renormalised supernet.

    With one active branch per list and renormalised mixing, the supernet computes exactly
    the policy's fake-quantized model, so scoring a policy is a mask switch and a forward.
    """

    def __init__(self, net: Supernet, x: Tensor, y: Tensor, metric: str = "acc"):
        if not all(layer.renormalise for layer in net.layers.values()):
            raise SmpqError("PolicyValue needs a supernet built with renormalise=True")
        self.subset = SubsetValue(net, x, y, metric)
        self.net = net

    def choice_index(self, policy_layers: dict) -> dict[str, tuple[int, int]]:
        out = {}
        for name in self.net.layers:
            c = policy_layers[name]
            out[name] = (self.net.w_specs.index(c.weight), self.net.a_specs.index(c.act))
        return out

    def __call__(self, choices: dict[str, tuple[int, int]]) -> float:
        return float(self.subset(policy_mask(self.net, choices)[None])[0])

    @property
    def calls(self) -> int:
        return self.subset.calls

    @property
    def forward_seconds(self) -> float:
        return self.subset.forward_seconds
