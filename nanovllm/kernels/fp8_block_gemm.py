"""Block-scaled FP8 GEMM (Hugging Face fine-grained FP8): ``out = x @ dequant(W)^T`` with W in float8_e4m3fn and one
float32 scale per 128x128 block of W, activations quantized per token and 128-column group inside the kernel.

The K loop steps one 128-column block at a time, so each step's activation tile is exactly one quantization group:
the program takes its rows' amax over the tile, quantizes the tile to fp8 (``fp8_quant.quantize_tile``, the same
arithmetic as ``quantize_rows``), multiplies it by the weight tile on the FP8 tensor cores, and adds the product into
a float32 accumulator times the activation scales (per row) and the weight block scales (per column). Promoting each
128-deep product to float32 this way is also what keeps Hopper's reduced-precision FP8 accumulation out of the sum.

Small batches (decode) have few output tiles, so ``pick_config`` splits K over ``split_k`` programs that write
float32 partial sums, which one ``sum`` adds up. Its float64 reference (same quantization) is in
``tests/gpu/test_fp8_gemm.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.kernels import INTERPRET, num_sms
from nanovllm.kernels.fp8_quant import AMAX_FLOOR, FP8_MAX, fp8_tile_dot, quantize_tile, scale_of

BLOCK = 128  # the weight's block shape (and the activation group)


@dataclass(frozen=True)
class BlockGemmConfig:
    block_m: int = 64
    block_n: int = 128
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def pick_config(m: int, n: int, k: int, sms: int) -> BlockGemmConfig:
    """Tiles by batch size: small M is bound by reading W, so narrow N tiles and split K until the grid covers
    the SMs about twice; large M is compute bound and takes big tiles. Untuned: ``benchmarks/fp8_gemm.py`` times it."""
    if m > 64:
        return BlockGemmConfig(block_m=128 if m >= 1024 else 64, block_n=128, num_warps=8 if m >= 1024 else 4)
    block_m = 16 if m <= 16 else 64
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, BLOCK)
    split = 1
    while tiles * split * 2 <= 2 * sms and split * 2 <= k_blocks:
        split *= 2
    return BlockGemmConfig(block_m=block_m, block_n=block_n, split_k=split, num_warps=4, num_stages=4)


@triton.jit(do_not_specialize=["M"])
def _block_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, out_ptr, M, stride_xm, stride_wn, stride_wsn, stride_os, stride_om,
    N: tl.constexpr, K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EMULATE: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = (offs_n % N).to(tl.int64)  # wrapped, never stored: no mask on the weight rows
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, K_PER_SPLIT // BLOCK_K):  # a fixed trip count; the last split's blocks past K are masked
        k0 = split * K_PER_SPLIT + i * BLOCK_K
        k_ok = k0 + offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x_scale = scale_of(tl.max(tl.abs(x), 1))
        xq = quantize_tile(x, x_scale[:, None], EMULATE)
        w = tl.load(w_ptr + offs_wn[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=k_ok[:, None], other=0.0)
        w_scale = tl.load(ws_ptr + (offs_wn // BLOCK_K) * stride_wsn + k0 // BLOCK_K)
        part = fp8_tile_dot(xq, w, EMULATE, x_ptr.dtype.element_ty == tl.float32)
        acc += part * x_scale[:, None] * w_scale[None, :]
    out = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])


def block_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               out_dtype: torch.dtype | None = None, config: BlockGemmConfig | None = None) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16/fp32) times FP8 ``weight [N, K]`` with ``weight_scale [ceil(N/128), ceil(K/128)]``
    -> ``[M, N]`` in ``out_dtype`` (default ``x.dtype``). No host sync; the grid depends only on shapes."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.dtype != torch.float8_e4m3fn or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"block_gemm takes row-major x [M, K] and fp8 weight [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if tuple(weight_scale.shape) != (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)) or weight_scale.stride(1) != 1:
        raise ValueError(f"weight_scale must be [{triton.cdiv(n, BLOCK)}, {triton.cdiv(k, BLOCK)}] row-major, got "
                         f"{tuple(weight_scale.shape)}")
    out_dtype = out_dtype or x.dtype
    cfg = config or pick_config(m, n, k, num_sms(x.device))
    if m == 0:
        return x.new_empty(0, n, dtype=out_dtype)
    k_blocks = triton.cdiv(k, BLOCK)
    split = max(1, min(cfg.split_k, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * BLOCK
    split = triton.cdiv(k, k_per_split)
    if split == 1:
        out = torch.empty(1, m, n, dtype=out_dtype, device=x.device)
    else:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _block_gemm_kernel[grid](
        x, weight, weight_scale, out, m, x.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0),
        out.stride(1), N=n, K=k, K_PER_SPLIT=k_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        GROUP_M=cfg.group_m, EMULATE=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out[0] if split == 1 else out.sum(0).to(out_dtype)


__all__ = ["AMAX_FLOOR", "FP8_MAX", "BlockGemmConfig", "block_gemm", "pick_config"]
