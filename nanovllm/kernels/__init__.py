"""Triton kernels (KV-cache write, paged decode and prefill, norm + rope, SwiGLU, fused MoE, sampling).

Importing this package does not import Triton, so CPU-only code paths stay free of it; import the
submodules where the kernels are needed.
"""
from __future__ import annotations

import functools
import os

import torch

# Triton's CPU interpreter computes bf16 ``tl.dot`` on raw bit patterns (triton-lang/triton#11584),
# so under it the kernels upcast dot operands to fp32; on a GPU this flag is False and costs nothing.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    """One of the FP8 formats caches and weights are stored in."""
    return dtype in FP8_DTYPES


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, which size kernel grids; 8 stands in under the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


@functools.cache
def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (a generous figure under the interpreter)."""
    if device.type != "cuda":
        return 1 << 20
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin or props.shared_memory_per_multiprocessor - 1024
