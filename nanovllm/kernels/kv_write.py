"""Scatter the new tokens' K/V into the paged KV cache.

One program per new token copies its ``[num_kv_heads, head_dim]`` K and V rows to flat slot
``slot_mapping[t]`` (page ``slot // block_size``, offset ``slot % block_size``). Slot -1 marks a
padding row (CUDA-graph padding, chunk tails) and is skipped by masking the stores, so the launch
never depends on how many rows are real.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcp, stride_kcs, stride_kch, stride_kcd,
    stride_vcp, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
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
    tl.store(kc, k.to(kc.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k``/``v`` ``[num_tokens, num_kv_heads, head_dim]`` into caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` at ``slot_mapping`` (``-1``: skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape, (v.shape, k.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    if num_tokens == 0:
        return
    page_size = k_cache.shape[1]
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
