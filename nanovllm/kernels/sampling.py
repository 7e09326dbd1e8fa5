"""Gumbel-max sampling in one read of the logits.

For each row: ``argmax_v(logits[v] * inv_temperature + g[v])`` where ``g`` is Gumbel noise derived from a hash of
(row key, v), or plain ``argmax(logits)`` for greedy rows. The noise is computed in registers, so the logits are
read once; the torch version (``nanovllm.layers.sampler``) materialises the noise, a dozen passes over a
``[batch, vocab]`` int64 tensor. Both use the same hash, so they sample the same tokens up to float rounding in
the logarithms.

Each row's vocabulary is cut into chunks, one program each, so a batch of 16 rows still fills the GPU (a second
tiny kernel picks each row's best chunk). The scores are in base 2, ``logit * inv_t * log2(e) - log2(-ln u)``
(the same argmax): the outer logarithm is the hardware's approximate ``log2``, one instruction where the precise
``log`` is a libdevice routine of some twenty. The inner one, ``-ln u``, needs relative accuracy near ``u = 1``
(the largest noise, the likely winners), which the approximate ``log2`` lacks there; ``_exponential`` gets it from
a short series in ``1 - u``, which the bits give exactly (see there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from nanovllm.kernels import INTERPRET, num_sms


@triton.jit
def _mix32(x):
    # the same rounds as nanovllm.layers.sampler._mix32, in wrapping uint32 arithmetic
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 16)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 16)
    x = x * 0x297A2D39
    return x ^ (x >> 16)


@triton.jit
def _uniform(bits):
    # as nanovllm.layers.sampler.uniform_from_bits: 23 bits, so the result stays strictly below 1
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _exponential(bits, INTERP: tl.constexpr):
    """``-ln u`` for ``u = _uniform(bits)``, to a few parts in a million relative. ``t = 1 - u`` is exact (both are
    ``(j + 0.5) / 2^23``); below 1/16 the series ``t + t^2/2 + ... + t^5/5`` of ``-ln(1 - t)`` is accurate to
    ``t^5 / 6`` relative, and above it ``u <= 15/16`` keeps ``log2 u`` far enough from 0 for the approximate
    ``log2``."""
    u = _uniform(bits)
    t = ((8388607 - (bits >> 9)).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    series = t * (1.0 + t * (0.5 + t * (1.0 / 3.0 + t * (0.25 + t * 0.2))))
    return tl.where(t < 0.0625, series, -0.6931471805599453 * _log2(u, INTERP))


@triton.jit
def _log2(x, INTERP: tl.constexpr):
    if INTERP:  # the CPU interpreter has no approximate log2
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _fold_block(logits_ptr, start, scale, key, is_random, best_value, best_index,
                VOCAB: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """Fold tokens ``start .. start + BLOCK`` of one row into the running best (score, index) of each lane: no
    reduction across lanes until the chunk's end."""
    cols = start + tl.arange(0, BLOCK)
    mask = cols < VOCAB
    score = tl.load(logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale
    if is_random:
        exponential = _exponential(_mix32(key * 0x01000193 + cols.to(tl.uint32)), INTERP)
        # the outer log2's small absolute error only nudges a score
        score = score - _log2(exponential, INTERP)
    # strict: a lane keeps its earliest index on ties (a NaN score never wins, where torch.argmax would pick it)
    better = mask & (score > best_value)
    return tl.where(better, score, best_value), tl.where(better, cols, best_index)


@triton.jit(do_not_specialize=["chunk_len", "num_chunks"])
def _chunk_best_kernel(
    logits_ptr, stride_row, inv_temp_ptr, keys_ptr, random_ptr, best_value_ptr, best_index_ptr,
    chunk_len, num_chunks, VOCAB: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):
    # the chunking is a run-time value, so one compiled kernel serves every batch size
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    is_random = tl.load(random_ptr + row) != 0
    # inverse temperature in base 2; greedy rows stay unscaled, so their argmax is torch's to the last bit
    scale = tl.where(is_random, tl.load(inv_temp_ptr + row) * 1.4426950408889634, 1.0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    first = chunk * chunk_len
    best_value = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK], VOCAB, tl.int32) + first  # an index no lane can beat on a tie
    if INTERP:  # the interpreter cannot loop over range() with run-time bounds
        start = first
        while start < first + chunk_len:
            best_value, best_index = _fold_block(row_ptr, start, scale, key, is_random, best_value, best_index,
                                                 VOCAB, BLOCK, INTERP)
            start += BLOCK
    else:
        for start in range(first, first + chunk_len, BLOCK):
            best_value, best_index = _fold_block(row_ptr, start, scale, key, is_random, best_value, best_index,
                                                 VOCAB, BLOCK, INTERP)
    # the chunk's best, and of the lanes holding it the earliest token, as torch.argmax breaks ties
    chunk_best = tl.max(best_value, axis=0)
    chunk_index = tl.min(tl.where(best_value == chunk_best, best_index, VOCAB + first), axis=0)
    chunk_index = tl.where(chunk_best == float("-inf"), first, chunk_index)  # all masked: the first, as torch
    tl.store(best_value_ptr + row * num_chunks + chunk, chunk_best)
    tl.store(best_index_ptr + row * num_chunks + chunk, chunk_index)


@triton.jit(do_not_specialize=["num_chunks"])
def _pick_chunk_kernel(best_value_ptr, best_index_ptr, out_ptr, num_chunks, MAX_CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    chunks = tl.arange(0, MAX_CHUNKS)
    values = tl.load(best_value_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
    # chunks are in vocabulary order, so the first best chunk holds the earliest best index
    first = tl.argmax(values, axis=0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(best_index_ptr + row * num_chunks + first).to(tl.int64))


_MAX_CHUNKS = 64


def num_vocab_chunks(batch: int, vocab: int, device: torch.device, block: int = 2048) -> int:
    """Chunks per row for about four programs per SM, at most 64 (a few rows leave SMs idle: each chunk is at
    least ``block`` tokens, and the chunk length is rounded up to whole blocks)."""
    return max(1, min(triton.cdiv(4 * num_sms(device), batch), _MAX_CHUNKS, triton.cdiv(vocab, block)))


def gumbel_argmax(
    logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, is_random: torch.Tensor,
    num_chunks: int | None = None, block: int = 2048,
) -> torch.Tensor:
    """``logits`` ``[B, V]`` (any float dtype, last dim contiguous); returns ``[B]`` int64 token ids."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if not batch:
        return out
    num_chunks = min(num_chunks or num_vocab_chunks(batch, vocab, logits.device, block), _MAX_CHUNKS)
    chunk_len = triton.cdiv(triton.cdiv(vocab, num_chunks), block) * block
    num_chunks = triton.cdiv(vocab, chunk_len)  # rounding the chunk up to whole blocks may leave fewer
    best_value = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(batch, num_chunks, dtype=torch.int32, device=logits.device)
    _chunk_best_kernel[(batch, num_chunks)](
        logits, logits.stride(0), inv_temperatures.float().contiguous(), keys.contiguous(),
        is_random.to(torch.int8).contiguous(), best_value, best_index, chunk_len, num_chunks,
        VOCAB=vocab, BLOCK=block, INTERP=INTERPRET, num_warps=8,
    )
    _pick_chunk_kernel[(batch,)](best_value, best_index, out, num_chunks, MAX_CHUNKS=_MAX_CHUNKS, num_warps=1)
    return out
