"""The interface every attention backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from nanovllm.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the paged cache (``store_kv``), then attends each query to its request's KV
    (``attend``). On CUDA the attention layer leaves the store to the rotary kernel, which writes k as it rotates it.

    Shapes: ``q`` is ``[num_tokens, num_heads, head_dim]``; ``k`` and ``v`` are
    ``[num_tokens, num_kv_heads, head_dim]``; caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    Attention returns ``[num_tokens, num_heads, head_dim]`` in ``q``'s dtype. An FP8 cache stores ``value / scale``
    with the layer's ``k_scale`` / ``v_scale`` (``[1]`` float32 on the device; ``None`` reads as 1.0).
    """

    name: str = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers (split sizes, workspaces). Called once before the forward."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        return self.attend(q, k_cache, v_cache, meta, scale, k_scale, v_scale)

    @abstractmethod
    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> None:
        """Copy each new token's K/V into its slot; slot -1 marks a padding row."""

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each query row against its request's cached KV, causally (its own K/V already stored)."""
