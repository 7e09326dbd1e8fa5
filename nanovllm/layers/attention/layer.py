"""The attention layer models use: it owns its slice of the paged KV cache and defers the math to the backend."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.layers.attention.context import get_forward_context
from nanovllm.layers.attention.metadata import KVWrite
from nanovllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # bound by the model runner once the pool is allocated
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: RotaryEmbedding,
        qk_norms: tuple[Any, Any] | None = None,
    ) -> torch.Tensor:
        """``q``: ``[num_tokens, num_heads * head_dim]``, ``k``/``v``: ``[num_tokens, num_kv_heads * head_dim]``,
        q and k before the rotary embedding (and the per-head ``qk_norms``, if the model has them)."""
        ctx = get_forward_context()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda:  # one kernel normalises and rotates q and k and writes k and v into the cache
            kv_write = KVWrite(v, self.k_cache, self.v_cache, ctx.meta.slot_mapping)
            q, k = rotary(positions, q, k, qk_norms, kv_write)
        else:
            q, k = rotary(positions, q, k, qk_norms)
            ctx.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.meta.slot_mapping)
        out = ctx.backend.attend(q, self.k_cache, self.v_cache, ctx.meta, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)
