"""smpq: mixed-precision quantization with Shapley-value bit-width allocation.

The public API, in the order data flows: layers -> policy -> cost/budget -> quantized model.
Importing does no work beyond importing torch.
"""

from smpq.apply import calibrate_, dequantize_, quantizable_layers, quantize_, supernet_
from smpq.cnn.pipeline import calibration_batches, default_pinned, ptq, qat
from smpq.cnn.supernet import Supernet
from smpq.cost import Budget, ModelCost, trace_costs
from smpq.errors import SmpqError
from smpq.policy import Policy
from smpq.spec import LayerChoice, QuantSpec, act_spec, weight_spec

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
