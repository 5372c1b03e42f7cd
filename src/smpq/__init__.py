"""smpq: mixed-precision quantization with Shapley-value bit-width allocation.

The public API, in the order data flows: layers -> policy -> cost/budget -> quantized model.
Importing is cheap: each public name loads its module (and torch) on first use, so the `smpq`
command starts its Ctrl-C handling before torch loads (one line and exit 130, no traceback).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smpq.apply import calibrate_, dequantize_, quantizable_layers, quantize_, supernet_
    from smpq.cnn.pipeline import calibration_batches, default_pinned, ptq, qat
    from smpq.cnn.supernet import Supernet
    from smpq.cost import Budget, ModelCost, trace_costs
    from smpq.errors import SmpqError
    from smpq.policy import Policy
    from smpq.spec import LayerChoice, QuantSpec, act_spec, weight_spec

_HOME = {
    **dict.fromkeys(["calibrate_", "dequantize_", "quantizable_layers", "quantize_",
                     "supernet_"], "smpq.apply"),
    **dict.fromkeys(["calibration_batches", "default_pinned", "ptq", "qat"],
                    "smpq.cnn.pipeline"),
    "Supernet": "smpq.cnn.supernet",
    **dict.fromkeys(["Budget", "ModelCost", "trace_costs"], "smpq.cost"),
    "SmpqError": "smpq.errors",
    "Policy": "smpq.policy",
    **dict.fromkeys(["LayerChoice", "QuantSpec", "act_spec", "weight_spec"], "smpq.spec"),
}


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'smpq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Budget",
    "LayerChoice",
    "ModelCost",
    "Policy",
    "QuantSpec",
    "SmpqError",
    "Supernet",
    "act_spec",
    "calibrate_",
    "calibration_batches",
    "default_pinned",
    "dequantize_",
    "ptq",
    "qat",
    "quantizable_layers",
    "quantize_",
    "supernet_",
    "trace_costs",
    "weight_spec",
]

__version__ = "0.1.0"
