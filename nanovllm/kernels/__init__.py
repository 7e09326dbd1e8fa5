"""Triton kernels for the GPU attention path (KV-cache write, paged decode, paged prefill/extend).

Importing this package does not import Triton, so CPU-only code paths stay free of it; import the
submodules (``kv_write``, ``paged_decode``, ``paged_prefill``) where the kernels are needed.
"""
from __future__ import annotations

import os

# Triton's CPU interpreter computes bf16 ``tl.dot`` on raw bit patterns (triton-lang/triton#11584),
# so under it the kernels upcast dot operands to fp32; on a GPU this flag is False and costs nothing.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
