"""The reference attention backend: plain torch on any device. The GPU kernels are tested against it. (On CUDA
the attention layer has the rotary kernel write the KV cache, whichever backend attends.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.layers.attention.base import AttentionBackend
from nanovllm.layers.attention.kv_quant import dequantize_kv, is_fp8, quantize_kv
from nanovllm.layers.attention.metadata import AttentionMetadata


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Copy each new token's K/V (quantized, for an FP8 cache) into its slot; slot -1 marks a padding row."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = quantize_kv(new[valid], scale, cache.dtype)
        if is_fp8(cache.dtype):  # index_copy_ has no FP8 kernels; the bytes are what moves
            cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
        cache.view(-1, *cache.shape[-2:]).index_copy_(0, slots, rows)


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens stored in ``pages``: ``[length, num_kv_heads, head_dim]``."""
    return cache[pages].flatten(0, 1)[:length]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> None:
        write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if meta.is_decode_only:
            return self._decode(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
        return self._mixed(q, k_cache, v_cache, meta, scale, k_scale, v_scale)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """One query per sequence: gather every sequence's pages into a padded batch and mask the tail."""
        batch, num_heads, _ = q.shape
        block_size = k_cache.shape[1]
        num_pages = -(-meta.max_seq_len // block_size)
        pages = meta.block_tables[:batch, :num_pages].long()
        keys = dequantize_kv(k_cache[pages].flatten(1, 2)[:, : meta.max_seq_len], k_scale, q.dtype)  # [B, S, Hkv, D]
        values = dequantize_kv(v_cache[pages].flatten(1, 2)[:, : meta.max_seq_len], v_scale, q.dtype)
        group = num_heads // keys.shape[2]
        keys = keys.transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, S, D]
        values = values.transpose(1, 2).repeat_interleave(group, dim=1)
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < meta.seq_lens[:batch, None]).view(batch, 1, 1, -1)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale)
        return out.squeeze(2)

    def _mixed(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
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
            keys = dequantize_kv(gather_kv(k_cache, pages, seq_len), k_scale, q.dtype).transpose(0, 1)  # [Hkv, S, D]
            values = dequantize_kv(gather_kv(v_cache, pages, seq_len), v_scale, q.dtype).transpose(0, 1)
            query = q[start : start + query_len].transpose(0, 1)  # [H, L, D]
            group = query.shape[0] // keys.shape[0]
            keys = keys.repeat_interleave(group, dim=0)
            values = values.repeat_interleave(group, dim=0)
            query_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            key_pos = torch.arange(seq_len, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
            out[start : start + query_len] = attn.transpose(0, 1)
            start += query_len
        return out
