"""Per-head RMSNorm of q and k (Qwen3's QK-norm) and the rotary embedding, in place, in one kernel.

Written as torch ops this is four kernels per layer (norm q, norm k, rotate q, rotate k). At decode sizes each is
a few microseconds of launch-bound work, about half a millisecond a step over 28 layers; at prefill sizes the
rotary's gather of cos/sin is slow. Here one program per token loads its q and k heads once, normalises them (if
asked), rotates them (rotate-half layout) and writes them back where they were, so q and k may stay views of the
qkv projection's output.

Given a ``KVWrite``, the same program also writes the token's rotated k and its v into the paged KV cache (the
work of ``kernels/kv_write.py`` otherwise, FP8 quantization included): one kernel fewer per layer, and k is stored
from registers.

Rounding follows the torch reference: the normalised head is rounded to the activation dtype before the weight
multiplies it, and the rotation is computed in fp32 and rounded once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nanovllm.kernels.kv_write import fp8_max, scaled_for_cache

if TYPE_CHECKING:
    from nanovllm.layers.attention.metadata import KVWrite


@triton.jit
def _norm_rope_heads(x_ptr, stride_h, h, h_mask, w_ptr, cos, sin, half, eps,
                     HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    ptrs = x_ptr + h[:, None] * stride_h + half[None, :]
    x1 = tl.load(ptrs, mask=h_mask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HEAD_DIM // 2, mask=h_mask[:, None], other=0.0).to(tl.float32)
    if NORM:
        dtype = x_ptr.dtype.element_ty
        mean_square = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM
        scale = tl.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(w_ptr + half).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HEAD_DIM // 2 + half).to(tl.float32)[None, :]
        x1 = ((x1 * scale).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * scale).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(ptrs, y1, mask=h_mask[:, None])
    tl.store(ptrs + HEAD_DIM // 2, y2, mask=h_mask[:, None])
    return y1, y2


@triton.jit
def _norm_rope_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_vt, stride_vh, stride_page, stride_slot, stride_head,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, NORM: tl.constexpr, WRITE_KV: tl.constexpr, PAGE_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + t).to(tl.int64)
    half = tl.arange(0, HEAD_DIM // 2)
    # the cache row is [cos of each frequency | sin of each frequency]
    cos = tl.load(cos_sin_ptr + position * stride_cs + half)[None, :]
    sin = tl.load(cos_sin_ptr + position * stride_cs + HEAD_DIM // 2 + half)[None, :]
    hq = tl.arange(0, Q_PAD)
    _norm_rope_heads(q_ptr + t * stride_qt, stride_qh, hq, hq < NUM_Q_HEADS, q_weight_ptr, cos, sin, half, eps,
                     HEAD_DIM, NORM)
    hk = tl.arange(0, K_PAD)
    k1, k2 = _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, hk, hk < NUM_K_HEADS, k_weight_ptr, cos, sin, half,
                              eps, HEAD_DIM, NORM)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: page * page stride overflows int32 on large caches
        mask = (hk[:, None] < NUM_K_HEADS) & (slot >= 0)
        cache_offsets = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot + hk[:, None] * stride_head
        k_dst = k_cache_ptr + cache_offsets + half[None, :]
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_dst, scaled_for_cache(k1, k_scale_ptr, FP8_MAX).to(cache_dtype), mask=mask)
        tl.store(k_dst + HEAD_DIM // 2, scaled_for_cache(k2, k_scale_ptr, FP8_MAX).to(cache_dtype), mask=mask)
        d = tl.arange(0, HEAD_DIM)
        v = tl.load(v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :], mask=mask)
        v = scaled_for_cache(v, v_scale_ptr, FP8_MAX)
        tl.store(v_cache_ptr + cache_offsets + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def norm_rope_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_write: KVWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise (when weights are given) and rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in place; with
    ``kv_write``, also write the rotated k and ``kv_write.v`` into the paged KV cache.

    ``q``/``k``/``v`` may be strided views (of a fused qkv output) as long as each head's ``D`` values are contiguous.
    ``cos_sin_cache``: ``[max_position, D]`` fp32, cos of the ``D / 2`` frequencies then their sin.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape == (num_tokens, num_k_heads, head_dim) and positions.shape == (num_tokens,)
    assert q.stride(2) == 1 and k.stride(2) == 1, "each head's values must be contiguous"
    assert head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0, "head_dim must be a power of two"
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    norm = q_weight is not None
    assert norm == (k_weight is not None), "give both norm weights or neither"
    if num_tokens == 0:
        return q, k
    if kv_write is not None:
        v, k_cache, v_cache, slots = kv_write.v, kv_write.k_cache, kv_write.v_cache, kv_write.slot_mapping
        assert v.shape == k.shape and v.stride(2) == 1 and slots.shape == (num_tokens,)
        assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
        assert k_cache.shape[2:] == (num_k_heads, head_dim) and k_cache.stride(3) == 1
        v_strides, cache_strides, page_size = (v.stride(0), v.stride(1)), k_cache.stride()[:3], k_cache.shape[1]
        fp8 = fp8_max(k_cache.dtype)
        assert not fp8 or (kv_write.k_scale is not None and kv_write.v_scale is not None), "FP8 needs its scales"
        k_scale, v_scale = (kv_write.k_scale, kv_write.v_scale) if fp8 else (k, k)
    else:  # unused: any tensor fills the pointer slots
        v, k_cache, v_cache, slots, k_scale, v_scale = k, k, k, positions, k, k
        v_strides, cache_strides, page_size, fp8 = (0, 0), (0, 0, 0), 1, 0.0
    _norm_rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, q_weight if norm else q, k_weight if norm else k, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        v, k_cache, v_cache, slots, k_scale, v_scale, *v_strides, *cache_strides,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, Q_PAD=triton.next_power_of_2(num_q_heads),
        K_PAD=triton.next_power_of_2(num_k_heads), HEAD_DIM=head_dim, NORM=norm, WRITE_KV=kv_write is not None,
        PAGE_SIZE=page_size, FP8_MAX=fp8, num_warps=4,
    )
    return q, k
