"""Fused mixture-of-experts: sort (token, expert) pairs by expert, then two grouped GEMMs.

Same contract as ``nanovllm.layers.moe_ops.moe_reference`` (its torch reference and test oracle).

1. Alignment (``moe_align``, three small kernels, no host sync). The ``M*k`` pairs, numbered
   ``pair = token*k + slot``, are laid out expert by expert, each expert's segment padded to a
   multiple of ``BLOCK_M`` so every GEMM block of rows belongs to one expert. Padding holds the
   sentinel ``M*k``. Buffers are sized for the worst case ``M*k + min(M*k, E)*(BLOCK_M-1)`` (at
   most ``min(M*k, E)`` experts are non-empty, each wasting < ``BLOCK_M`` rows), so the launch grids
   depend only on shapes and the path replays under CUDA graphs; blocks past the real padded length
   (a device-side count) exit at once. The pairs are split into chunks: ``_chunk_count`` takes a
   histogram of each chunk, ``_chunk_offsets`` (one program) turns the ``[chunks, E]`` histogram into
   where each chunk's pairs of each expert go, and ``_chunk_scatter`` sorts each chunk by
   (expert, pair) and writes the pairs there. No atomics, so the layout is deterministic.
2. GEMM 1 (``_moe_gemm``, GATED): rows of ``hidden`` gathered by token, times ``w13[e]^T``; each
   program keeps a gate and an up accumulator for the same ``BLOCK_N`` columns and writes
   ``silu(gate) * up`` straight into ``inter [padded, I]`` at the sorted position, so the
   ``[M*k, 2I]`` activation is never materialised.
3. GEMM 2: contiguous rows of ``inter`` times ``w2[e]^T``, scaled by the routing weight and written
   to ``out_pairs [M*k, H]`` at the pair index; ``out = out_pairs.view(M, k, H).sum(1)``. Each output
   element is written exactly once, so the result does not depend on scheduling.

FP8 experts (Hugging Face fine-grained FP8: float8_e4m3fn weights, one float32 scale per 128x128 block,
``w13_scale [E, 2I/128, H/128]``, ``w2_scale [E, H/128, I/128]``) run the same GEMMs with ``BLOCK_K = 128``: each
K step quantizes its activation tile per row (one 128-column group, as ``kernels/fp8_block_gemm.py`` does), takes
the FP8 dot and adds it into the float32 accumulator times the row and block scales. Reference:
``moe_ops.moe_reference_fp8``.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.kernels import INTERPRET
from nanovllm.kernels.fp8_quant import fp8_tile_dot, quantize_tile, scale_of


@dataclass(frozen=True)
class MoEConfig:
    """Tile shape and launch parameters of the grouped GEMMs."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4


def pick_config(num_tokens: int, num_experts: int, top_k: int) -> MoEConfig:
    """Choose tiles from the mean rows per expert (``M*k/E``).

    Decode (a few rows per expert) is bound by reading expert weights: BLOCK_M=16 (the smallest
    ``tl.dot`` tile) wastes the least padding and 64-wide N tiles give enough programs to keep the
    loads in flight. As rows per expert grow the GEMMs turn compute bound and bigger tiles reuse each
    weight tile for more rows. Picked with ``benchmarks/bench_moe.py --sweep`` on an H100 at
    Qwen3-30B-A3B shapes (E=128, k=8, H=2048, I=768): M=1..64 -> 16, 256 -> 32, 1024 -> 64,
    4096/8192 -> 128 (BLOCK_M=128 beat 64 by ~15% there).
    """
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 8:
        return MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 32:
        return MoEConfig(block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=3)
    if rows_per_expert <= 128:
        return MoEConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    return MoEConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one program may use (Hopper: 227 KiB)."""
    if device.type != "cuda":
        return 227 * 1024  # the interpreter has no limit; keep the GPU's tiles
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 227 * 1024)


def fit_shared_memory(cfg: MoEConfig, element_size: int, budget: int, fixed_block_k: bool = False) -> MoEConfig:
    """Shrink the pipeline, then the K tile (or, with ``fixed_block_k``, as FP8 experts need one K step per scale
    block, the N and then the M tile) until the staged tiles fit in ``budget`` bytes. The tiles above were tuned for
    bf16; fp32 takes twice the room. Counted for the gated GEMM, whose B tile holds gate and up (this count is what
    Triton asks for)."""
    def tile_bytes(c: MoEConfig) -> int:
        return (c.block_m * c.block_k + 2 * c.block_k * c.block_n) * element_size * c.num_stages

    while tile_bytes(cfg) > budget and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while tile_bytes(cfg) > budget and cfg.block_k > 16 and not fixed_block_k:
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    while tile_bytes(cfg) > budget and cfg.block_n > 16:
        cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    while tile_bytes(cfg) > budget and cfg.block_m > 16:
        cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2)
    return cfg


# --------------------------------------------------------------------------------------------
# alignment


# The token counts (num_pairs, num_chunks, num_blocks_m) change from step to step: not specialised on, so a new
# batch size never compiles a new variant mid-run.
@triton.jit(do_not_specialize=["num_pairs"])
def _chunk_count_kernel(ids_ptr, counts_ptr, num_pairs, E: tl.constexpr, E_PAD: tl.constexpr,
                        CHUNK: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    hist = tl.histogram(ids, E_PAD, mask=mask)
    e = tl.arange(0, E_PAD)
    tl.store(counts_ptr + c * E + e, hist, mask=e < E)


@triton.jit(do_not_specialize=["num_chunks", "num_pairs"])
def _chunk_offsets_kernel(counts_ptr, delta_ptr, seg_end_ptr, sorted_ids_ptr, num_chunks, num_pairs,
                          E: tl.constexpr, E_PAD: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    c = tl.arange(0, CHUNKS_PAD)
    e = tl.arange(0, E_PAD)
    e_mask = e < E
    mask = (c[:, None] < num_chunks) & e_mask[None, :]
    counts = tl.load(counts_ptr + c[:, None] * E + e[None, :], mask=mask, other=0)

    total = tl.sum(counts, 0)                                   # pairs per expert
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    seg_end = tl.cumsum(padded, 0)
    seg_start = seg_end - padded
    tl.store(seg_end_ptr + e, seg_end, mask=e_mask)

    # Chunk c's pairs of expert e start after earlier chunks' pairs of e (prefix down the column);
    # within chunk c, sorted by expert, they start after the chunk's pairs of lower experts (prefix
    # along the row). _chunk_scatter adds its sorted index to the difference.
    before_chunk = tl.cumsum(counts, 0) - counts
    before_expert = tl.cumsum(counts, 1) - counts
    delta = seg_start[None, :] + before_chunk - before_expert
    tl.store(delta_ptr + c[:, None] * E + e[None, :], delta, mask=mask)

    # Padding rows of each segment hold the sentinel num_pairs.
    p = tl.arange(0, BLOCK_M)
    pad_pos = seg_start[:, None] + total[:, None] + p[None, :]
    pad_mask = e_mask[:, None] & (p[None, :] < (padded - total)[:, None])
    tl.store(sorted_ids_ptr + pad_pos, tl.full([E_PAD, BLOCK_M], 0, tl.int32) + num_pairs,
             mask=pad_mask)


@triton.jit(do_not_specialize=["num_pairs"])
def _chunk_scatter_kernel(ids_ptr, delta_ptr, sorted_ids_ptr, num_pairs,
                          E: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    i = tl.arange(0, CHUNK)
    offs = c * CHUNK + i
    # out-of-range slots get expert E so they sort last and are not stored
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=E)
    keys = tl.sort(ids * CHUNK + i)                  # by expert, then by pair: stable
    expert = keys // CHUNK
    valid = expert < E
    delta = tl.load(delta_ptr + c * E + expert, mask=valid, other=0)
    tl.store(sorted_ids_ptr + delta + i, c * CHUNK + keys % CHUNK, mask=valid)


@dataclass
class MoEAlignment:
    """Pairs grouped by expert. ``sorted_ids[p]``: the pair at padded position p (sentinel M*k for
    padding), sized for the worst case; ``seg_end[e]``: where expert e's padded segment ends, so
    ``seg_end[-1]`` is the real padded length and entries of ``sorted_ids`` past it are unspecified."""

    sorted_ids: torch.Tensor
    seg_end: torch.Tensor
    block_m: int


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Group the ``topk_ids.numel()`` pairs by expert into segments padded to ``block_m``."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32)
    num_pairs = ids.numel()
    max_padded = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    num_blocks = triton.cdiv(max_padded, block_m)
    e_pad = triton.next_power_of_2(num_experts)
    # Chunks small enough that the [chunks, E] table fits one program's registers.
    max_chunks = max(1, 8192 // e_pad)
    chunk = max(64, triton.next_power_of_2(triton.cdiv(num_pairs, max_chunks)))
    num_chunks = triton.cdiv(num_pairs, chunk)

    counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    delta = torch.empty_like(counts)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    seg_end = torch.empty(num_experts, dtype=torch.int32, device=device)

    _chunk_count_kernel[(num_chunks,)](ids, counts, num_pairs, E=num_experts, E_PAD=e_pad,
                                       CHUNK=chunk, num_warps=4)
    _chunk_offsets_kernel[(1,)](counts, delta, seg_end, sorted_ids, num_chunks, num_pairs,
                                E=num_experts, E_PAD=e_pad,
                                CHUNKS_PAD=triton.next_power_of_2(num_chunks),
                                BLOCK_M=block_m, num_warps=8)
    _chunk_scatter_kernel[(num_chunks,)](ids, delta, sorted_ids, num_pairs, E=num_experts,
                                         CHUNK=chunk, num_warps=4)
    return MoEAlignment(sorted_ids, seg_end, block_m)


# --------------------------------------------------------------------------------------------
# grouped GEMM


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32; UPCAST works around the interpreter's bf16 dot. fp32 operands use
    full-precision ``ieee`` products (not tf32) so float32 models match the reference closely."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _fp8_dot(a, b, b_scale_ptrs, acc, EMULATE: tl.constexpr):
    """``acc + quant(a) @ b`` times the rows' and the block's scales: ``a`` one 128-column group, ``b`` FP8."""
    af = a.to(tl.float32)
    a_scale = scale_of(tl.max(tl.abs(af), 1))
    aq = quantize_tile(af, a_scale[:, None], EMULATE)
    part = fp8_tile_dot(aq, b, EMULATE, a.dtype == tl.float32)
    return acc + part * a_scale[:, None] * tl.load(b_scale_ptrs)[None, :]


@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, seg_end_ptr, bs_ptr,
    num_pairs, num_blocks_m, E, TOP_K,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_bse, stride_bsn, stride_bsk,
    N: tl.constexpr, K: tl.constexpr,  # model dimensions: fixed per layer, so no recompiles
    E_PAD: tl.constexpr,
    A_BY_TOKEN: tl.constexpr,   # a rows are tokens (pair // TOP_K), else padded positions
    C_BY_PAIR: tl.constexpr,    # c rows are pairs, else padded positions
    GATED: tl.constexpr,        # b rows [0, N) gate and [N, 2N) up: write silu(gate) * up
    MUL_WEIGHT: tl.constexpr,   # scale rows by their routing weight
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8: tl.constexpr,          # b is FP8 with 128x128 block scales at bs_ptr (BLOCK_K == 128)
):
    # Grouped launch order: GROUP_M row blocks (mostly of one expert) sweep the N tiles together,
    # so each weight tile is fetched from HBM once and re-read from L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    # Row blocks past the real padded length exist only to keep the grid fixed.
    row0 = pid_m * BLOCK_M
    if row0 >= tl.load(seg_end_ptr + E - 1):
        return
    # This block's expert: the number of segments ending at or before its first row (empty
    # segments end where they start, so they are counted and skipped).
    e = tl.arange(0, E_PAD)
    seg_end = tl.load(seg_end_ptr + e, mask=e < E, other=2147483647)
    expert = tl.sum((seg_end <= row0).to(tl.int32), 0).to(tl.int64)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    if A_BY_TOKEN:
        a_row = (pair // TOP_K).to(tl.int64)
    else:
        a_row = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap instead of masking the weight loads; the wrapped columns are never stored
    offs_bn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None] * stride_bk
    # FP8: this tile's columns' block-scale rows (the up half's lie N rows further), stepped one K block at a time
    bs_ptrs = bs_ptr + expert * stride_bse + (offs_bn // 128) * stride_bsn
    bs_up_ptrs = bs_ptr + expert * stride_bse + ((offs_bn + N) // 128) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            acc = _fp8_dot(a, b, bs_ptrs + (k0 // 128) * stride_bsk, acc, UPCAST)
        else:
            acc = _dot(a, b, acc, UPCAST)
        if GATED:
            if EVEN_K:
                b_up = tl.load(b_ptrs + N * stride_bn)
            else:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None], other=0.0)
            if FP8:
                acc_up = _fp8_dot(a, b_up, bs_up_ptrs + (k0 // 128) * stride_bsk, acc_up, UPCAST)
            else:
                acc_up = _dot(a, b_up, acc_up, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    if C_BY_PAIR:
        c_row = pair.to(tl.int64)
    else:
        c_row = offs_m.to(tl.int64)
    c_ptrs = c_ptr + c_row[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < N)[None, :])


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
                  align: MoEAlignment, top_k: int, *, n: int, a_by_token: bool, c_by_pair: bool,
                  gated: bool, mul_weight: bool, cfg: MoEConfig, b_scale: torch.Tensor | None = None) -> None:
    k = a.shape[1]
    num_experts = b.shape[0]
    num_blocks_m = align.sorted_ids.numel() // align.block_m
    grid = (num_blocks_m * triton.cdiv(n, cfg.block_n),)
    bs = b_scale if b_scale is not None else weights  # a placeholder pointer when not FP8
    bs_strides = b_scale.stride() if b_scale is not None else (0, 0, 0)
    _moe_gemm_kernel[grid](
        a, b, c, weights, align.sorted_ids, align.seg_end, bs, weights.numel(), num_blocks_m,
        num_experts, top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), *bs_strides,
        N=n, K=k, E_PAD=triton.next_power_of_2(num_experts), A_BY_TOKEN=a_by_token, C_BY_PAIR=c_by_pair, GATED=gated,
        MUL_WEIGHT=mul_weight, EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        UPCAST=INTERPRET, FP8=b_scale is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: MoEConfig | None = None,
    poison: bool = False,
) -> torch.Tensor:
    """SwiGLU experts on routed tokens; same contract as ``moe_reference`` (``moe_reference_fp8`` for FP8).

    Args:
        hidden: ``[M, H]``; w13: ``[E, 2*I, H]`` (gate rows then up rows); w2: ``[E, H, I]``.
        topk_weights: ``[M, k]`` routing weights; topk_ids: ``[M, k]`` expert ids.
        w13_scale, w2_scale: for float8_e4m3fn ``w13``/``w2``, their float32 128x128 block scales
            ``[E, 2*I/128, H/128]`` and ``[E, H/128, I/128]`` (I a multiple of 128).
        config: tile override (benchmarks, tuning); default ``pick_config``.
        poison: fill the work buffers with NaN first, so tests catch rows the kernels never write.

    Returns:
        ``[M, H]`` in ``hidden.dtype``. No host syncs; shapes depend only on the input shapes.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter_size, hidden_size), w13.shape
    assert w2.shape == (num_experts, hidden_size, inter_size), w2.shape
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k)
    fp8 = w13.dtype == torch.float8_e4m3fn
    if fp8 != (w13_scale is not None) or fp8 != (w2_scale is not None) or (fp8 and inter_size % 128):
        raise ValueError("FP8 experts take both block scales (and an intermediate size that is a multiple of 128); "
                         "unquantized experts take none")
    if num_tokens == 0:
        return hidden.new_empty(0, hidden_size)
    if config is not None:
        cfg = config
    elif fp8:  # one K step per 128-column scale block; the tiles hold bf16 activations, so budget 2 bytes each
        cfg = dataclasses.replace(pick_config(num_tokens, num_experts, top_k), block_k=128)
        cfg = fit_shared_memory(cfg, hidden.element_size(), shared_memory_per_block(hidden.device),
                                fixed_block_k=True)
    else:
        cfg = fit_shared_memory(pick_config(num_tokens, num_experts, top_k), w13.element_size(),
                                shared_memory_per_block(hidden.device))
    if fp8 and cfg.block_k != 128:
        raise ValueError(f"FP8 experts need block_k 128, got {cfg.block_k}")
    align = moe_align(topk_ids, num_experts, cfg.block_m)
    weights = topk_weights.reshape(-1).float().contiguous()
    num_pairs = weights.numel()

    inter = hidden.new_empty(align.sorted_ids.numel(), inter_size)
    out_pairs = hidden.new_empty(num_pairs, hidden_size)
    if poison:
        inter.fill_(float("nan"))
        out_pairs.fill_(float("nan"))

    _grouped_gemm(hidden, w13, inter, weights, align, top_k, n=inter_size, a_by_token=True,
                  c_by_pair=False, gated=True, mul_weight=False, cfg=cfg, b_scale=w13_scale)
    _grouped_gemm(inter, w2, out_pairs, weights, align, top_k, n=hidden_size, a_by_token=False,
                  c_by_pair=True, gated=False, mul_weight=True, cfg=cfg, b_scale=w2_scale)
    # bf16 sum accumulates in fp32 inside torch and rounds once
    return out_pairs.view(num_tokens, top_k, hidden_size).sum(dim=1)
