"""Gumbel-max sampling in one pass over the logits.

For each row: ``argmax_v(logits[v] * inv_temperature + g[v])`` where ``g`` is Gumbel noise derived from a hash of
(row key, v), or plain ``argmax(logits)`` for greedy rows. The noise is computed in registers, so the kernel reads
the logits once and writes one token per row; the torch version (``nanovllm.layers.sampler``) materialises the
noise, a dozen passes over a ``[batch, vocab]`` int64 tensor. Both use the same hash, so they sample the same
tokens up to float rounding in the logarithms.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _gumbel_argmax_kernel(
    logits_ptr, stride_row, inv_temp_ptr, keys_ptr, random_ptr, out_ptr,
    VOCAB: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    inv_temp = tl.load(inv_temp_ptr + row)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    is_random = tl.load(random_ptr + row) != 0
    best_value = tl.full([], float("-inf"), tl.float32)
    best_index = tl.full([], 0, tl.int32)
    for start in range(0, VOCAB, BLOCK):  # VOCAB is fixed per model: one compile
        cols = start + tl.arange(0, BLOCK)
        mask = cols < VOCAB
        logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        score = logits * inv_temp
        if is_random:
            bits = _mix32(key * 0x01000193 + cols.to(tl.uint32))
            uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = score - tl.log(-tl.log(uniform))
        score = tl.where(mask, score, float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int32) + start
        better = block_best > best_value  # strict: the earliest index wins ties, as in torch.argmax
        best_index = tl.where(better, block_index, best_index)
        best_value = tl.where(better, block_best, best_value)
    tl.store(out_ptr + row, best_index.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, is_random: torch.Tensor
) -> torch.Tensor:
    """``logits`` ``[B, V]`` (any float dtype, last dim contiguous); returns ``[B]`` int64 token ids."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _gumbel_argmax_kernel[(batch,)](
            logits, logits.stride(0), inv_temperatures.float().contiguous(), keys.contiguous(),
            is_random.to(torch.int8).contiguous(), out, VOCAB=vocab, BLOCK=2048, num_warps=8,
        )
    return out
