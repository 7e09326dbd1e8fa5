"""Per-head RMSNorm of q and k (Qwen3's QK-norm) and the rotary embedding, in place, in one kernel.

Written as torch ops this is four kernels per layer (norm q, norm k, rotate q, rotate k). At decode sizes each is
a few microseconds of launch-bound work, about half a millisecond a step over 28 layers; at prefill sizes the
rotary's gather of cos/sin is slow. Here one program per token loads its q and k heads once, normalises them (if
asked), rotates them (rotate-half layout) and writes them back where they were, so q and k may stay views of the
qkv projection's output.

Rounding follows the torch reference: the normalised head is rounded to the activation dtype before the weight
multiplies it, and the rotation is computed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    tl.store(ptrs, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=h_mask[:, None])
    tl.store(ptrs + HEAD_DIM // 2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=h_mask[:, None])


@triton.jit
def _norm_rope_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, NORM: tl.constexpr,
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
    _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, hk, hk < NUM_K_HEADS, k_weight_ptr, cos, sin, half, eps,
                     HEAD_DIM, NORM)


def norm_rope_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise (when weights are given) and rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in place.

    ``q``/``k`` may be strided views (of a fused qkv output) as long as each head's ``D`` values are contiguous.
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
    _norm_rope_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache, q_weight if norm else q, k_weight if norm else k, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, Q_PAD=triton.next_power_of_2(num_q_heads),
        K_PAD=triton.next_power_of_2(num_k_heads), HEAD_DIM=head_dim, NORM=norm, num_warps=4,
    )
    return q, k
