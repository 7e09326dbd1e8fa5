"""Paged decode attention (one query token per sequence), flash-decoding style.

Grid ``(num_kv_heads, batch, num_splits)``. Each program owns a contiguous, page-aligned slice of one
sequence's KV (``ceil(num_pages / num_splits)`` pages, so long and short sequences split evenly) and
attends all query heads of its GQA group at once: they form a ``[GROUP_PAD, head_dim]`` block (padded to
16 rows for ``tl.dot``), so every KV tile is read once per KV head. Online softmax in fp32 with exp2.
Each split writes a normalised partial output and its log2-sum-exp; a second kernel merges the splits.
With one split the first kernel writes the final output directly. ``num_splits`` is a launch constant,
so the grid and workspaces depend only on shapes and the launch replays under CUDA graphs.

An FP8 cache (``KV_FP8``) is read as it is stored, half the bytes of bf16, and widened to the query's dtype in
registers; the K scale folds into the softmax scale and the V scale into the final normalisation, so no dequantized
copy of the cache exists anywhere.

The GPU starts programs roughly in grid order, and a batch's contexts differ by 10x or more: started in batch
order, a few long sequences can be the last programs running on an otherwise idle GPU. An optional ``order``
(the rows longest first, made on the host) starts the longest first, so the short ones fill in the tail (within
each split index, the grid's slowest axis). The KV
heads of one sequence are neighbours in the grid, so their reads of the same pages fall together.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nanovllm.kernels import INTERPRET, is_fp8

LOG2E = math.log2(math.e)


@triton.jit
def _mma(a, b, acc, INTERP: tl.constexpr):
    """``acc + a @ b`` in fp32; the interpreter multiplies bf16 bit patterns unless upcast. float32 inputs use
    full-precision products (not tf32), so a float32 model matches the torch backend token for token."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _fp8_compute_dtype(q):
    """What an FP8 cache is widened to: fp16 for half-precision queries (one conversion instruction from FP8, where
    bf16 takes several; a bf16 query is exact in fp16 unless tiny or huge), fp32 for fp32 queries."""
    if q.dtype == tl.float32:
        return q
    return q.to(tl.float16)


@triton.jit
def _kv_tile_offsets(bt_row_ptr, stride_bt_p, t, t_mask, PAGE_SIZE: tl.constexpr,
                     stride_p, stride_s):
    """Element offset of tokens ``t`` (one page-table lookup each) within one KV cache."""
    page = tl.load(bt_row_ptr + (t // PAGE_SIZE) * stride_bt_p, mask=t_mask, other=0).to(tl.int64)
    return page * stride_p + (t % PAGE_SIZE) * stride_s


@triton.jit
def _decode_tile(
    q, m_i, l_i, acc, tile, end, bt_row, stride_btp, k_base, v_base,
    stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
    GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    INTERP: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One online-softmax step of a GQA group over KV tokens ``[tile, tile + BLOCK_N) & < end``."""
    t = tile + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    t_mask = t < end
    k_off = _kv_tile_offsets(bt_row, stride_btp, t, t_mask, PAGE_SIZE, stride_kp, stride_ks)
    k = tl.load(k_base + k_off[:, None] + d[None, :] * stride_kd, mask=t_mask[:, None], other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    s = _mma(q, tl.trans(k), tl.zeros([GROUP_PAD, BLOCK_N], tl.float32), INTERP) * qk_scale
    s = tl.where(t_mask[None, :], s, float("-inf"))
    # every tile holds >= 1 valid token, so m_new is finite and alpha never sees inf - inf
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = _kv_tile_offsets(bt_row, stride_btp, t, t_mask, PAGE_SIZE, stride_vp, stride_vs)
    v = tl.load(v_base + v_off[:, None] + d[None, :] * stride_vd, mask=t_mask[:, None], other=0.0)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], INTERP)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_btb"])  # the block table's width changes from step to step
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, order_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ORDER: tl.constexpr,
    INTERP: tl.constexpr, KV_FP8: tl.constexpr,
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    if HAS_ORDER:
        b = tl.load(order_ptr + b)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    pages_per_split = tl.cdiv(tl.cdiv(seq_len, PAGE_SIZE), NUM_SPLITS)
    start = split * pages_per_split * PAGE_SIZE
    end = tl.minimum(start + pages_per_split * PAGE_SIZE, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None], other=0.0)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        q = _fp8_compute_dtype(q)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    if INTERP:
        # the interpreter cannot take loaded scalars as range() bounds (numpy >= 2.4), so it loops
        # with while; the GPU keeps the for loop, which Triton software-pipelines
        tile = start
        while tile < end:
            m_i, l_i, acc = _decode_tile(
                q, m_i, l_i, acc, tile, end, bt_row, stride_btp, k_base, v_base,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
                GROUP_PAD, BLOCK_N, HEAD_DIM, PAGE_SIZE, INTERP, KV_FP8)
            tile += BLOCK_N
    else:
        for tile in range(start, end, BLOCK_N):
            m_i, l_i, acc = _decode_tile(
                q, m_i, l_i, acc, tile, end, bt_row, stride_btp, k_base, v_base,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
                GROUP_PAD, BLOCK_N, HEAD_DIM, PAGE_SIZE, INTERP, KV_FP8)

    # l_i == 0 only for an empty split (or seq_len == 0 padding rows): emit zeros / -inf, never NaN
    nonempty = l_i > 0
    o = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    if NUM_SPLITS == 1:
        out = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(out, o.to(out.dtype.element_ty), mask=g_mask[:, None])
    else:
        po = part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(po + d[None, :] * stride_pd, o, mask=g_mask[:, None])
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, SPLIT_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLIT_PAD)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + s * stride_ls,
                  mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0): weights 0, output 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    # empty splits' partial rows are never read, so a poisoned workspace cannot leak NaN in
    valid = lse > float("-inf")
    po = tl.load(part_out_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :] * stride_pd,
                 mask=valid[:, None], other=0.0)
    o = tl.sum(po * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    out = out_ptr + b * stride_ob + h * stride_oh + d * stride_od
    tl.store(out, o.to(out.dtype.element_ty))


def alloc_decode_workspace(
    max_batch: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs ``[max_batch, num_heads, num_splits, head_dim]`` and log2-sum-exps
    ``[max_batch, num_heads, num_splits]``, fp32; allocate once and reuse (CUDA-graph safe)."""
    part_out = torch.empty(max_batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(max_batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return part_out, part_lse


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    order: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` (one token per sequence) over each sequence's paged KV.

    An FP8 cache (float8_e4m3fn or float8_e5m2) needs its ``k_scale``/``v_scale`` (``[1]`` float32, on the device).
    ``block_tables [B, P]`` int32 page ids, ``seq_lens [B]`` int32 KV lengths (0 gives a zero row).
    ``order [B]`` int32, a permutation of the rows: the order in which their programs start (longest first
    balances the SMs); the output is the same whatever it is.
    ``workspace`` from ``alloc_decode_workspace`` with at least ``B`` rows and ``num_splits`` splits;
    allocated here when omitted. ``block_n`` is the KV tile (tokens per loop step) and ``num_stages`` the loads in
    flight; the defaults were the fastest on an H100 at batch 256: 128 tokens unsplit and 64 split, 2 stages, on a
    bf16 cache; 64 tokens and 3 stages on FP8 (241 against 258 us with the bf16 choice, ``benchmarks/kv_decode.py``).
    """
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert page_size & (page_size - 1) == 0, "block_size must be a power of two"
    assert block_tables.shape[0] == batch and seq_lens.shape == (batch,)
    assert order is None or order.shape == (batch,)
    assert batch <= 65535, "the batch is the grid's second axis, which CUDA limits to 65,535"
    assert num_splits >= 1
    kv_fp8 = is_fp8(k_cache.dtype)
    assert not kv_fp8 or (k_scale is not None and v_scale is not None), "an FP8 cache needs its scales"
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    block_n = block_n or (128 if num_splits == 1 and not kv_fp8 else 64)
    num_stages = num_stages or (3 if kv_fp8 else 2)
    assert block_n >= 16 and block_n & (block_n - 1) == 0

    if num_splits > 1:
        if workspace is None:
            workspace = alloc_decode_workspace(batch, num_heads, head_dim, num_splits, q.device)
        part_out, part_lse = workspace
        # a workspace made for more splits also works: the kernels index by stride
        assert part_out.shape[0] >= batch and part_out.shape[2] >= num_splits, "workspace too small"
        assert part_out.shape[1] == num_heads and part_out.shape[3] == head_dim
        assert part_lse.shape[0] >= batch and part_lse.shape[2] >= num_splits
    else:
        part_out, part_lse = out, out  # unused by the kernel; any tensor fills the slot
    po_strides = part_out.stride() if num_splits > 1 else (0, 0, 0, 0)
    lse_strides = part_lse.stride() if num_splits > 1 else (0, 0, 0)

    _paged_decode_kernel[(num_kv_heads, batch, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, order if order is not None else seq_lens,
        out, part_out, part_lse, k_scale if kv_fp8 else seq_lens, v_scale if kv_fp8 else seq_lens,
        scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        *po_strides, *lse_strides,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, HAS_ORDER=order is not None,
        INTERP=INTERPRET, KV_FP8=kv_fp8,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part_out, part_lse, out, *part_out.stride(), *part_lse.stride(), *out.stride(),
            NUM_SPLITS=num_splits, SPLIT_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out
