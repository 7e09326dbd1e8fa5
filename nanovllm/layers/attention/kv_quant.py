"""The FP8 KV cache's number format: which dtype a ``kv_cache_dtype`` names, and the torch reference of how a value
goes in (divided by its layer's scale, clamped to the format's range, rounded to nearest) and comes out (times the
scale). The Triton kernels do the same in registers and are tested against these.

Per-layer scales are one float32 each for K and V, kept on the device (kernels load them, so CUDA graphs captured
before a scale changes still read the new value). They come from the checkpoint, or 1.0, or are measured on the first
real prefill (``calculate_kv_scales``) as ``amax / K_SCALE_CONSTANT`` for K and ``amax / V_SCALE_CONSTANT`` for V, the
divisors vLLM uses: they leave headroom for larger values later in the run.
"""
from __future__ import annotations

import torch

from nanovllm.kernels import is_fp8
from nanovllm.layers.quantization.fp8_formats import to_fp8

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """``"auto"``: the model's dtype; else the FP8 format it names."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return KV_CACHE_DTYPES[kv_cache_dtype]


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the cache's dtype: for FP8, ``x / scale`` clamped to the format's finite range, then rounded."""
    return to_fp8(x, scale, dtype) if is_fp8(dtype) else x.to(dtype)


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cached values back in ``dtype``: for FP8, times the scale (in fp32, rounded once)."""
    if not is_fp8(cache.dtype):
        return cache.to(dtype)
    values = cache.float()
    return (values if scale is None else values * scale).to(dtype)


def calibrated_scales(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales from one batch's K and V, computed on the device (no host sync); never zero."""
    k_scale = (k.detach().abs().amax().float() / K_SCALE_CONSTANT).clamp_min(1e-8)
    v_scale = (v.detach().abs().amax().float() / V_SCALE_CONSTANT).clamp_min(1e-8)
    return k_scale.reshape(1), v_scale.reshape(1)
