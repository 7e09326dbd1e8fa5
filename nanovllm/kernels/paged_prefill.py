"""Paged prefill / extend attention for mixed batches (prefill chunks, prefix-hit extends, decodes).

Request ``i``'s new tokens (rows ``query_start_loc[i]:query_start_loc[i+1]``) attend causally to its
whole KV, already in the paged cache: row ``j`` sits at position ``seq_lens[i] - q_len_i + j``.
Grid ``(num_tokens // BLOCK_Q + batch, num_kv_heads)``: request ``i`` owns program ids starting at
``query_start_loc[i] // BLOCK_Q + i`` (always enough for its ``ceil(q_len / BLOCK_Q)`` blocks; spare
programs exit), found by binary search, so the grid needs only shapes and no host sync. A program
holds ``BLOCK_Q`` tokens x all query heads of one KV head (GQA) as ``BLOCK_M`` rows, so each KV tile
is read once per group; tiles wholly before the block's first position skip the causal mask. An FP8 cache is
widened in registers, its scales folded in as in ``paged_decode``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels import INTERPRET, is_fp8
from nanovllm.kernels.paged_decode import LOG2E, _fp8_compute_dtype, _kv_tile_offsets, _mma


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, tile, pos, kv_end,
    bt_row, stride_btp, k_base, v_base,
    stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    MASK: tl.constexpr, INTERP: tl.constexpr, KV_FP8: tl.constexpr,
):
    t = tile + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    t_mask = t < kv_end
    k_off = _kv_tile_offsets(bt_row, stride_btp, t, t_mask, PAGE_SIZE, stride_kp, stride_ks)
    v_off = _kv_tile_offsets(bt_row, stride_btp, t, t_mask, PAGE_SIZE, stride_vp, stride_vs)
    if MASK:
        k = tl.load(k_base + k_off[:, None] + d[None, :] * stride_kd, mask=t_mask[:, None], other=0.0)
        v = tl.load(v_base + v_off[:, None] + d[None, :] * stride_vd, mask=t_mask[:, None], other=0.0)
    else:
        k = tl.load(k_base + k_off[:, None] + d[None, :] * stride_kd)
        v = tl.load(v_base + v_off[:, None] + d[None, :] * stride_vd)
    if KV_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERP) * qk_scale
    if MASK:
        # each row sees KV position 0 in the first tile, so its running max is finite from then on
        s = tl.where((t[None, :] <= pos[:, None]) & t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], INTERP)
    return m_new, l_i, acc


# Triton specialises integer arguments on == 1 and divisibility by 16; these change from step to step, and a
# new specialisation is a compile of about a second in the middle of serving
@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr, k_scale_ptr, v_scale_ptr,
    num_seqs, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERP: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # last request whose first program id is <= pid
    lo = tl.full([], 0, tl.int32)
    hi = lo + (num_seqs - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        take = tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    req = lo
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + req)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    tok = q_block * BLOCK_Q + r // GROUP_PAD
    hg = r % GROUP_PAD
    row_mask = (tok < q_len) & (hg < GROUP)
    heads = kvh * GROUP + hg
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_mask[:, None], other=0.0)
    pos = ctx_len + tok
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        q = _fp8_compute_dtype(q)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + req.to(tl.int64) * stride_btb
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    first_pos = ctx_len + q_block * BLOCK_Q
    full_end = (first_pos // BLOCK_N) * BLOCK_N  # every row may see all of [0, full_end)
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    if INTERP:
        # while loops: the interpreter cannot use loaded scalars as range() bounds (numpy >= 2.4)
        tile = full_end * 0
        while tile < full_end:
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, pos, kv_end, bt_row, stride_btp, k_base, v_base,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
                BLOCK_M, BLOCK_N, HEAD_DIM, PAGE_SIZE, False, INTERP, KV_FP8)
            tile += BLOCK_N
        while tile < kv_end:
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, pos, kv_end, bt_row, stride_btp, k_base, v_base,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
                BLOCK_M, BLOCK_N, HEAD_DIM, PAGE_SIZE, True, INTERP, KV_FP8)
            tile += BLOCK_N
    else:
        for tile in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, pos, kv_end, bt_row, stride_btp, k_base, v_base,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
                BLOCK_M, BLOCK_N, HEAD_DIM, PAGE_SIZE, False, INTERP, KV_FP8)
        for tile in range(full_end, kv_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, pos, kv_end, bt_row, stride_btp, k_base, v_base,
                stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
                BLOCK_M, BLOCK_N, HEAD_DIM, PAGE_SIZE, True, INTERP, KV_FP8)

    o = acc / l_i[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    out = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od
    tl.store(out, o.to(out.dtype.element_ty), mask=row_mask[:, None])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``q [num_tokens, Hq, D]`` (request ``i``: rows ``query_start_loc[i]:[i+1]``)
    over each request's paged KV (``seq_lens[i]`` tokens, new ones included and already stored).

    Rows past ``query_start_loc[-1]`` (padding) are left unwritten. ``block_m`` counts query rows
    (tokens x heads of one GQA group); it is raised to the padded group size if smaller. An FP8 cache needs its
    ``k_scale``/``v_scale`` (``[1]`` float32).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert page_size & (page_size - 1) == 0, "block_size must be a power of two"
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_n >= 16 and block_n & (block_n - 1) == 0 and block_m & (block_m - 1) == 0
    kv_fp8 = is_fp8(k_cache.dtype)
    assert not kv_fp8 or (k_scale is not None and v_scale is not None), "an FP8 cache needs its scales"
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(block_m, group_pad, 16)
    block_q = block_m // group_pad

    _paged_prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        k_scale if kv_fp8 else seq_lens, v_scale if kv_fp8 else seq_lens, num_seqs, scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, INTERP=INTERPRET, KV_FP8=kv_fp8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
