"""Round-to-nearest weight quantization: the baseline every other backend must beat.

Scales come from each row / group's own min-max (`choose_qparams`), so RTN needs no
calibration data. It is a thin wrapper so that every backend shares one signature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smpq.errors import SmpqError
from smpq.primitives import fake_quantize
from smpq.spec import QuantSpec

__all__ = ["rtn_quantize_weight"]


def rtn_quantize_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    """Fake-quantized copy of `w` (same shape/dtype, no autograd) for any int/minifloat spec,
    or a GGUF block format (llama.cpp's reference quantizer, via `fake_quantize`)."""
    if w.dim() < 1:
        raise SmpqError(f"a weight must be at least 1-D, got shape {tuple(w.shape)}")
    with torch.no_grad():
        return fake_quantize(w.detach(), spec)
