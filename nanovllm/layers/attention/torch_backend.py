"""The reference attention backend: plain torch on any device. The GPU kernels are tested against it. (On CUDA
the attention layer has the rotary kernel write the KV cache, whichever backend attends.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.layers.attention.base import AttentionBackend
from nanovllm.layers.attention.metadata import AttentionMetadata


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Copy each new token's K/V into its slot; slot -1 marks a padding row."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[valid].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[valid].to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens stored in ``pages``: ``[length, num_kv_heads, head_dim]``."""
    return cache[pages].flatten(0, 1)[:length]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        write_kv(k, v, k_cache, v_cache, slot_mapping)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.is_decode_only:
            return self._decode(q, k_cache, v_cache, meta, scale)
        return self._mixed(q, k_cache, v_cache, meta, scale)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """One query per sequence: gather every sequence's pages into a padded batch and mask the tail."""
        batch, num_heads, _ = q.shape
        block_size = k_cache.shape[1]
        num_pages = -(-meta.max_seq_len // block_size)
        pages = meta.block_tables[:batch, :num_pages].long()
        keys = k_cache[pages].flatten(1, 2)[:, : meta.max_seq_len]  # [B, S, Hkv, D]
        values = v_cache[pages].flatten(1, 2)[:, : meta.max_seq_len]
        group = num_heads // keys.shape[2]
        keys = keys.transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, S, D]
        values = values.transpose(1, 2).repeat_interleave(group, dim=1)
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < meta.seq_lens[:batch, None]).view(batch, 1, 1, -1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
        )
        return out.squeeze(2)

    def _mixed(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Prefill chunks and decodes together: one causal attention per request, offset by its cached length."""
        assert meta.query_lens_cpu is not None and meta.seq_lens_cpu is not None
        block_size = k_cache.shape[1]
        out = torch.empty_like(q)
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if query_len == 0:
                continue
            pages = meta.block_tables[i, : -(-seq_len // block_size)].long()
            keys = gather_kv(k_cache, pages, seq_len).transpose(0, 1)  # [Hkv, S, D]
            values = gather_kv(v_cache, pages, seq_len).transpose(0, 1)
            query = q[start : start + query_len].transpose(0, 1)  # [H, L, D]
            group = query.shape[0] // keys.shape[0]
            keys = keys.repeat_interleave(group, dim=0).to(q.dtype)
            values = values.repeat_interleave(group, dim=0).to(q.dtype)
            query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            key_pos = torch.arange(seq_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
            out[start : start + query_len] = attn.transpose(0, 1)
            start += query_len
        return out
