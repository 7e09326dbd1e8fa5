"""What the attention layers need to know about the current batch.

The model runner flattens a scheduled batch into one token stream: request ``i`` owns the query rows
``query_start_loc[i]:query_start_loc[i+1]`` and, after this step, ``seq_lens[i]`` tokens of KV in its pages
(``block_tables[i]``). Its new tokens sit at the end of that KV, so query row ``j`` of request ``i`` is at
position ``seq_lens[i] - query_len_i + j`` and attends causally to KV positions ``<= `` that.

KV cache layout, per layer: ``k_cache`` and ``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``, in
the model's dtype or FP8 (``kv_quant.py``).
Token ``t`` of a request lives in page ``block_tables[i, t // block_size]`` at offset ``t % block_size``; its flat
slot is ``page * block_size + offset`` (``slot_mapping`` gives it for every new token, -1 for padding rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVWrite:
    """Where a layer's new K/V go: ``v [num_tokens, num_kv_heads, head_dim]`` (k travels beside it), the layer's
    caches, each token's flat slot (``-1``: a padding row, not written), and the layer's K and V scales (``[1]``
    float32, what an FP8 cache divides by; unused by other caches)."""

    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot of each new token (-1: skip)
    query_start_loc: torch.Tensor  # [batch + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [batch] int32, KV length of each request after this step
    block_tables: torch.Tensor  # [batch, max_pages] int32, page ids (unused entries are arbitrary)
    max_query_len: int
    max_seq_len: int
    # decode-only batches: the rows longest first, the order in which the decode kernel starts them
    decode_order: torch.Tensor | None = None  # [batch] int32
    # host copies, so reference code can loop without a device sync
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
