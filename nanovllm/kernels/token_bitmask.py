"""A grammar's token bitmask applied to the logits in one launch.

Bit ``t % 32`` of ``bitmask[i, t // 32]`` set means row ``rows[i]`` may sample token ``t``; every other token of that
row gets ``-inf``, in place. Tokens past the bitmask's width (a grammar over the tokenizer's ids under a head padded
past them) are never allowed. The torch version (``nanovllm.layers.sampler.apply_token_bitmask``) takes eight
launches and a ``[rows, vocab]`` boolean tensor; on a step of a few milliseconds its launches alone cost the host a
few hundred microseconds, in the part of a constrained step that the device waits for.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_words"])
def _mask_kernel(logits_ptr, stride_row, rows_ptr, bitmask_ptr, num_words, VOCAB: tl.constexpr,
                 BLOCK: tl.constexpr):
    index = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    words = cols // 32
    row = tl.load(rows_ptr + index)
    word = tl.load(bitmask_ptr + index.to(tl.int64) * num_words + words, mask=words < num_words, other=0)
    allowed = ((word >> (cols % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_row + cols, float("-inf"), mask=(cols < VOCAB) & ~allowed)


def mask_disallowed_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor, block: int = 4096) -> None:
    """``-inf`` into ``logits [B, V]`` (last dim contiguous) wherever row ``rows[i]``'s ``bitmask [len(rows), W]``
    (int32) has the token's bit clear."""
    vocab = logits.shape[-1]
    assert logits.stride(-1) == 1 and bitmask.dtype == torch.int32 and bitmask.shape[0] == rows.shape[0]
    if not rows.numel():
        return
    grid = (rows.shape[0], triton.cdiv(vocab, block))
    _mask_kernel[grid](logits, logits.stride(0), rows, bitmask.contiguous(), bitmask.shape[1], VOCAB=vocab,
                       BLOCK=block, num_warps=4)
