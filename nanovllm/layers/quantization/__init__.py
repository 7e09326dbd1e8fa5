"""FP8 weights: the checkpoint formats (``config.py``), quantize / dequantize (``fp8_formats.py``), the linear
layers' FP8 method (``fp8_linear.py``) and its GPU GEMMs (``fp8_gemm.py``), the MoE experts' (``fp8_moe.py``)."""
from typing import Any

from nanovllm.layers.quantization.config import (
    Fp8Scheme,
    QuantConfig,
    module_names,
    resolve_quant_config,
)
from nanovllm.layers.quantization.fp8_linear import Fp8LinearMethod


def process_weights_after_loading(model: Any) -> None:
    """Ready every FP8 layer's forward once its weights are in (``quant_method.process_after_loading``)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_after_loading(module)


__all__ = ["Fp8LinearMethod", "Fp8Scheme", "QuantConfig", "module_names", "process_weights_after_loading",
           "resolve_quant_config"]
