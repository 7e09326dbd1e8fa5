"""The attention layer models use: it owns its slice of the paged KV cache (and, for an FP8 cache, the K and V scales
of this layer) and defers the math to the backend."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.layers.attention.context import get_forward_context
from nanovllm.layers.attention.kv_quant import calibrated_scales
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
        # what an FP8 cache stores is value / scale; 1.0 unless the checkpoint or a calibration says otherwise
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.calibrate_on_next_prefill = False

    def calibrate_kv_scales(self) -> None:
        """Measure this layer's K and V scales on the next forward that prefills (``calculate_kv_scales``); until
        then the cache is empty, and decode-only forwards (CUDA-graph capture, warm-up) are not real data."""
        self.calibrate_on_next_prefill = True

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
        calibrate = self.calibrate_on_next_prefill and not ctx.meta.is_decode_only
        if q.is_cuda and not calibrate:  # one kernel normalises and rotates q and k and writes k and v into the cache
            kv_write = KVWrite(v, self.k_cache, self.v_cache, ctx.meta.slot_mapping, self.k_scale, self.v_scale)
            q, k = rotary(positions, q, k, qk_norms, kv_write)
        else:
            q, k = rotary(positions, q, k, qk_norms)
            if calibrate:  # from the rotated k, as it is stored
                k_scale, v_scale = calibrated_scales(k, v)
                self.k_scale.copy_(k_scale)
                self.v_scale.copy_(v_scale)
                self.calibrate_on_next_prefill = False
            ctx.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.meta.slot_mapping, self.k_scale, self.v_scale)
        out = ctx.backend.attend(q, self.k_cache, self.v_cache, ctx.meta, self.scale, self.k_scale, self.v_scale)
        return out.reshape(-1, self.num_heads * self.head_dim)
