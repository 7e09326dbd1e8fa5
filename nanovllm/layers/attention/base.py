"""The interface every attention backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from nanovllm.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the paged cache, then attends each query to its request's KV.

    Shapes: ``q`` is ``[num_tokens, num_heads, head_dim]``; ``k`` and ``v`` are
    ``[num_tokens, num_kv_heads, head_dim]``; caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    Returns ``[num_tokens, num_heads, head_dim]`` in ``q``'s dtype.
    """

    name: str = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Per-step work shared by all layers (split sizes, workspaces). Called once before the forward."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...
