"""The FP8 GEMMs on a GPU with FP8 tensor cores (compute capability 8.9+), one function per path.

- ``rowwise_linear``: per-channel (or per-tensor, held per channel) weight scales through ``torch._scaled_mm``
  with row-wise scales; activations quantized per token on the device (``kernels/fp8_quant.py``), or under the
  checkpoint's static ``input_scale``. ``_scaled_mm`` wants K and N multiples of 16 and the weight column-major
  (``W.t()`` of the row-major ``[N, K]`` weight); M is padded to a multiple of 16 inside the quantized activation
  buffer (the padding rows are sliced off the output), which also keeps old torch versions' M rule.
- ``block_linear``: 128x128 block scales, through the Triton block GEMM (``kernels/fp8_block_gemm.py``, activation
  quantization fused in) or, where torch has it (CUDA 12.9+, Hopper), ``torch._scaled_mm``'s block-wise mode with
  activations quantized per token and 128-column group.

``BLOCK_BACKEND`` picks the block path the layers use; ``benchmarks/fp8_gemm.py`` times both per shape.
"""
from __future__ import annotations

import functools

import torch

BLOCK_BACKENDS = ("triton", "scaled_mm")
BLOCK_BACKEND = "triton"  # until the benchmark says otherwise per shape
_PAD_M = 16


@functools.cache
def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores (the Triton kernels): CUDA compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def rowwise_supported(device: torch.device) -> bool:
    """``torch._scaled_mm`` with row-wise scales: Hopper (9.0) or newer (its kernel is not built for Ada everywhere)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def rowwise_shapes_ok(n: int, k: int) -> bool:
    return n % 16 == 0 and k % 16 == 0


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_row: torch.Tensor,
                   input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` times FP8 ``weight [N, K]`` with float32 ``weight_scale_row [1, N]`` -> ``[M, N]`` in x.dtype."""
    from nanovllm.kernels.fp8_quant import quantize_rows

    m = x.shape[0]
    q, scale = quantize_rows(x, input_scale=input_scale, pad_to=_PAD_M)
    # row-wise scaling takes a bf16 output; other model dtypes are cast from it
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale_row, out_dtype=torch.bfloat16)
    return out[:m].to(x.dtype)


def block_scale_for_scaled_mm(weight_scale: torch.Tensor) -> torch.Tensor:
    """``[N/128, K/128]`` block scales as ``_scaled_mm`` takes them for the weight operand: the transposed view
    ``[K/128, N/128]`` of a buffer whose rows are padded to a multiple of 4 scales (16 bytes)."""
    rows, cols = weight_scale.shape
    padded = weight_scale.new_zeros(rows, -(-cols // 4) * 4)
    padded[:, :cols] = weight_scale
    return padded[:, :cols].t()


def block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, backend: str = "triton",
                 scaled_mm_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` times FP8 ``weight [N, K]`` with 128x128 ``weight_scale`` -> ``[M, N]`` in x.dtype.
    ``scaled_mm_scale``: ``block_scale_for_scaled_mm(weight_scale)``, prepared once (the ``scaled_mm`` backend)."""
    if backend == "triton":
        from nanovllm.kernels.fp8_block_gemm import block_gemm

        return block_gemm(x, weight, weight_scale)
    if backend != "scaled_mm":
        raise ValueError(f"block GEMM backend must be one of {list(BLOCK_BACKENDS)}, got {backend!r}")
    from nanovllm.kernels.fp8_quant import quantize_rows

    m = x.shape[0]
    q, scale = quantize_rows(x, group_size=128, pad_to=_PAD_M, token_major_scales=True)
    scale_b = scaled_mm_scale if scaled_mm_scale is not None else block_scale_for_scaled_mm(weight_scale)
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=scale_b, out_dtype=torch.bfloat16)
    return out[:m].to(x.dtype)
