"""Split-K for decode-sized row-parallel projections, with the sum folded into the next add + RMSNorm.

At decode, ``o_proj`` and ``down_proj`` multiply a few rows by a weight with few output columns (1,024 for
Qwen3-0.6B): cut into output tiles alone that is 8-16 programs on a 132-SM GPU, so reading the weight takes a
third of the time it could. Splitting K as well gives every SM a slice of the weight; each split leaves its fp32
partial product (``[splits, rows, cols]``) and the add + RMSNorm that follows every such projection in the model
adds the partials, in split order (the same bits every run), before adding the residual. Summing in the GEMM
instead, by the last program of each tile, cost more than the split saved.

The plan (split count and tile) depends only on the shapes and the SM count, so a CUDA graph captured for a batch
size replays the same kernels. Rounding follows the unsplit path: the sum is rounded to the activation dtype before
the residual add, as a bf16 GEMM output would be.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nanovllm.kernels import INTERPRET, num_sms, shared_memory_bytes

MAX_ROWS = 256  # past this, output tiles alone fill the GPU (and prefill-sized GEMMs are compute-bound)


@dataclasses.dataclass(frozen=True)
class SplitKPlan:
    splits: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


def plan_split_k(num_rows: int, out_features: int, in_features: int, sms: int,
                 shared_memory: int = 227 * 1024) -> SplitKPlan | None:
    """A plan that gives each SM about one program, or None when splitting would not help (enough output tiles
    already, too many rows, or shapes the tiles do not divide). Up to 4 stages of tiles, as many as the shared
    memory holds (with room left for the epilogue's fp32 tile)."""
    if not 0 < num_rows <= MAX_ROWS:
        return None
    block_m = min(64, max(16, triton.next_power_of_2(num_rows)))
    block_n, block_k = 64, 128
    if out_features % block_n or in_features % block_k:
        return None
    stage_bytes = 2 * (block_m + block_n) * block_k  # half-precision x and weight tiles
    num_stages = min(4, (shared_memory - 4 * block_m * block_n) // stage_bytes)
    if num_stages < 2:
        return None
    tiles = triton.cdiv(num_rows, block_m) * (out_features // block_n)
    splits = 1
    while tiles * splits * 2 <= sms and in_features % (block_k * splits * 2) == 0:
        splits *= 2
    if splits == 1:
        return None
    return SplitKPlan(splits, block_m, block_n, block_k, num_stages=num_stages)


@triton.jit(do_not_specialize=["M"])  # the row count varies with every eager step: one variant for all
def _split_k_kernel(x_ptr, w_ptr, partials_ptr, M, stride_x, N: tl.constexpr, K: tl.constexpr,
                    K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]  # the weight is [N, K]: read as [K, N] tiles
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K_PER_SPLIT, BLOCK_K):
        x = tl.load(x_ptrs, mask=rows[:, None] < M, other=0.0)
        w = tl.load(w_ptrs)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong (see ``kernels/__init__.py``)
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = partials_ptr + (split * M + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc.to(partials_ptr.dtype.element_ty), mask=rows[:, None] < M)


def split_k_matmul(x: torch.Tensor, weight: torch.Tensor, plan: SplitKPlan,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Partial products of ``x @ weight.T`` over ``plan.splits`` equal slices of K: ``[splits, rows, out]``, in fp32
    (with one split and ``out_dtype`` the activations' it is a plain GEMM, which the GEMM benchmark times)."""
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == in_features
    assert in_features % (plan.splits * plan.block_k) == 0 and out_features % plan.block_n == 0
    partials = torch.empty(plan.splits, num_rows, out_features, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(num_rows, plan.block_m), out_features // plan.block_n, plan.splits)
    _split_k_kernel[grid](
        x, weight, partials, num_rows, x.stride(0), N=out_features, K=in_features,
        K_PER_SPLIT=in_features // plan.splits, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        UPCAST=INTERPRET, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return partials


def plan_for(x: torch.Tensor, weight: torch.Tensor) -> SplitKPlan | None:
    """The plan for ``x @ weight.T`` on ``x``'s device (half-precision activations only)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 2:
        return None
    return plan_split_k(x.shape[0], weight.shape[0], weight.shape[1], num_sms(x.device),
                        shared_memory_bytes(x.device))


@triton.jit(do_not_specialize=["M"])
def _partials_add_rms_norm_kernel(partials_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, M, eps,
                                  N: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    total = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLITS):  # in split order: the same bits every run
        total += tl.load(partials_ptr + (split * M + row) * N + cols, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + row * N + cols, mask=mask, other=0.0)
    dtype = residual.dtype
    # as the unsplit path rounds: the projection's output, then the residual sum, in the activation dtype
    summed = (total.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(residual_out_ptr + row * N + cols, summed, mask=mask)
    x = summed.to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + cols, (weight.to(tl.float32) * normed.to(dtype).to(tl.float32)).to(dtype),
             mask=mask)


def partials_add_rms_norm(partials: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``RMSNorm(sum(partials) + residual)`` and that new residual, from ``[splits, rows, hidden]`` partials."""
    splits, num_rows, hidden = partials.shape
    assert residual.shape == (num_rows, hidden) and residual.is_contiguous() and partials.is_contiguous()
    out = torch.empty_like(residual)
    residual_out = torch.empty_like(residual)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _partials_add_rms_norm_kernel[(num_rows,)](
            partials, residual, weight, out, residual_out, num_rows, eps, N=hidden, SPLITS=splits, BLOCK=block,
            num_warps=4 if block <= 2048 else 8,
        )
    return out, residual_out
