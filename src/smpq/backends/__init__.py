"""Post-training weight quantization backends for nn.Linear layers: RTN, GPTQ, AWQ scaling.

Data flow: `collect_input_stats` (one hooked calibration pass: Hessians and per-channel
activation means) -> a backend from `BACKENDS` per layer and format -> fake-quantized weights
(`quantize_linear_weights`), which the caller may load into a copy of the model.
"""

from smpq.backends.awq import (
    AWQConfig,
    AWQResult,
    WeightQuantizer,
    awq_quantize,
    awq_scales,
    awq_then,
    gptq_quantizer,
    rtn_quantizer,
)
from smpq.backends.backends import (
    BACKENDS,
    Backend,
    awq_gptq_backend,
    awq_rtn_backend,
    get_backend,
    gptq_backend,
    quantize_linear_weights,
    rtn_backend,
)
from smpq.backends.gptq import (
    GPTQConfig,
    GPTQResult,
    PreparedHessian,
    gptq_quantize,
    gptq_quantize_weight,
    prepare_hessian,
)
from smpq.backends.hessian import (
    AbsMeanAccumulator,
    HessianAccumulator,
    collect_hessians,
    collect_input_stats,
    hessian_from_inputs,
    input_hooks,
    linear_layer,
    output_error,
    output_error_from_inputs,
    require_stat,
    run_batches,
)
from smpq.backends.rtn import rtn_quantize_weight

__all__ = [
    "AWQConfig",
    "AWQResult",
    "BACKENDS",
    "Backend",
    "AbsMeanAccumulator",
    "GPTQConfig",
    "GPTQResult",
    "HessianAccumulator",
    "PreparedHessian",
    "WeightQuantizer",
    "awq_gptq_backend",
    "awq_quantize",
    "awq_rtn_backend",
    "awq_scales",
    "awq_then",
    "collect_hessians",
    "collect_input_stats",
    "get_backend",
    "gptq_backend",
    "gptq_quantize",
    "gptq_quantize_weight",
    "gptq_quantizer",
    "hessian_from_inputs",
    "input_hooks",
    "linear_layer",
    "output_error",
    "output_error_from_inputs",
    "prepare_hessian",
    "quantize_linear_weights",
    "require_stat",
    "rtn_backend",
    "rtn_quantize_weight",
    "rtn_quantizer",
    "run_batches",
]
