"""Scatter the new tokens' K/V into the paged KV cache.

One program per new token copies its ``[num_kv_heads, head_dim]`` K and V rows to flat slot
``slot_mapping[t]`` (page ``slot // block_size``, offset ``slot % block_size``). Slot -1 marks a
padding row (CUDA-graph padding, chunk tails) and is skipped by masking the stores, so the launch
never depends on how many rows are real. An FP8 cache stores ``value / scale`` clamped to the format's range,
rounded to nearest even: bit for bit what ``layers/attention/kv_quant.quantize_kv`` makes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels import is_fp8


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 cache's format; 0.0 (no scaling) for any other cache."""
    return float(torch.finfo(dtype).max) if is_fp8(dtype) else 0.0


@triton.jit
def scaled_for_cache(x, scale_ptr, FP8_MAX: tl.constexpr):
    """``x`` as an FP8 cache takes it (divided by the scale, correctly rounded, then clamped); unchanged for others."""
    if FP8_MAX > 0:
        x = tl.math.div_rn(x.to(tl.float32), tl.load(scale_ptr))
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    return x


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcp, stride_kcs, stride_kch, stride_kcd,
    stride_vcp, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # int64 because page * page_stride overflows int32 on large caches
    page = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h[:, None] < NUM_KV_HEADS) & (slot >= 0)

    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    kc = k_cache_ptr + page * stride_kcp + off * stride_kcs + h[:, None] * stride_kch + d[None, :] * stride_kcd
    vc = v_cache_ptr + page * stride_vcp + off * stride_vcs + h[:, None] * stride_vch + d[None, :] * stride_vcd
    tl.store(kc, scaled_for_cache(k, k_scale_ptr, FP8_MAX).to(kc.dtype.element_ty), mask=mask)
    tl.store(vc, scaled_for_cache(v, v_scale_ptr, FP8_MAX).to(vc.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write ``k``/``v`` ``[num_tokens, num_kv_heads, head_dim]`` into caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at ``slot_mapping`` (``-1``: skip). An FP8 cache needs
    ``k_scale``/``v_scale`` (``[1]`` float32)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, (v.shape, k.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    if num_tokens == 0:
        return
    page_size = k_cache.shape[1]
    fp8 = fp8_max(k_cache.dtype)
    assert not fp8 or (k_scale is not None and v_scale is not None), "an FP8 cache needs its scales"
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale if fp8 else k, v_scale if fp8 else v,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, FP8_MAX=fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
