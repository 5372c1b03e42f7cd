"""High-level steps a user chains: pin layers, quantize post-training, finetune with QAT.

    model = ...                                   # any nn.Module with Linear/Conv2d layers
    names = list(quantizable_layers(model))
    policy = Policy.uniform(names, 4, 4, pinned=default_pinned(names))
    qmodel = ptq(model, policy, calibration_batches(train_set))
    acc, loss = evaluate(qmodel, val_set)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from smpq.apply import calibrate_, quantize_
from smpq.policy import Policy
from smpq.spec import LayerChoice

__all__ = ["calibration_batches", "default_pinned", "ptq", "qat"]


def default_pinned(names: Sequence[str], bits: int = 8) -> dict[str, LayerChoice]:
    """Keep the first and the last layer at 8/8, as is customary (they are small but fragile)."""
    names = list(names)
    if not names:
        return {}
    return {names[0]: LayerChoice.bits(bits, bits), names[-1]: LayerChoice.bits(bits, bits)}


def calibration_batches(
    dataset: Dataset, n_samples: int = 512, batch_size: int = 256, seed: int = 0
) -> list[Tensor]:
    """A fixed random subset of the inputs, in batches (labels dropped)."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(n_samples, n)]
    xs = torch.stack([dataset[int(i)][0] for i in idx])
    return list(xs.split(batch_size))


def ptq(
    model: nn.Module,
    policy: Policy,
    calib: Sequence[Tensor],
    *,
    act_method: str = "mse",
    learnable: bool = False,
) -> nn.Module:
    """A quantized copy of `model` (the original is untouched), calibrated on `calib`."""
    qmodel = copy.deepcopy(model)
    quantize_(qmodel, policy, act_method=act_method, learnable=learnable)
    calibrate_(qmodel, calib)
    return qmodel.eval()


def qat(
    model: nn.Module,
    policy: Policy,
    train_set: Dataset,
    cfg,
    calib: Sequence[Tensor],
    *,
    distill: bool = True,
    progress=None,
) -> nn.Module:
    """Quantization-aware finetune with LSQ steps and learned activation ranges.

    With `distill` the float model is the teacher (cfg.kd_weight sets the mix).
    """
    from smpq.cnn.train import train  # heavy loop; imported where used

    qmodel = ptq(model, policy, calib, learnable=True)
    teacher = copy.deepcopy(model).eval() if distill else None
    train(qmodel, train_set, cfg, teacher=teacher, progress=progress)
    return qmodel.eval()
