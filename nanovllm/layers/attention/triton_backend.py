"""Attention backend on this package's Triton kernels (the GPU default).

Per layer: the new tokens' K/V are written into the paged cache (in a model's forward by the rotary kernel as
it rotates k; ``store_kv`` otherwise), then a decode-only batch runs
the split-KV ``paged_decode`` and any other batch (prefill chunks, prefix-hit extends, decodes mixed
in) runs ``paged_prefill`` in one launch. Nothing here reads device data on the host, so a forward
can be captured in a CUDA graph.
"""
from __future__ import annotations

import logging

import torch
import triton

from nanovllm.kernels import num_sms
from nanovllm.kernels.kv_write import store_kv
from nanovllm.kernels.paged_decode import alloc_decode_workspace, paged_decode
from nanovllm.kernels.paged_prefill import paged_prefill
from nanovllm.layers.attention.base import AttentionBackend
from nanovllm.layers.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels.

    Args:
        num_heads, num_kv_heads, head_dim: this rank's attention shapes (query heads a multiple of KV heads).
        max_num_seqs: largest decode batch; the split-KV workspace is sized for it once, here.
        device: where the workspace lives.
        num_splits: fixed KV splits per decode sequence; ``None`` picks it from the batch size alone
            (about 8 programs per SM rounded up to a power of two, none once the batch alone gives 5, at most
            ``max_num_splits``). Either way it depends on shapes
            only, so a graph captured for one batch size replays the same launch.
        max_num_splits: upper bound for the automatic choice (and the workspace's split dimension).
    """

    name = "triton"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_num_seqs: int,
        device: torch.device | str,
        num_splits: int | None = None,
        max_num_splits: int = 16,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_num_seqs = max_num_seqs
        self.fixed_splits = num_splits
        self.max_num_splits = num_splits if num_splits is not None else max_num_splits
        device = torch.device(device)
        # H100, 8 KV heads, context U[100, 2048], longest first: batch 32 ran best with 4-16 splits, 64 with 2-4
        # (1 split was slower), 96 and 128 unsplit (88% and 93% of copy bandwidth, against 85% and 90% with 2)
        self.target_programs = 8 * num_sms(device)
        self.unsplit_programs = 5 * num_sms(device)
        # one workspace serves every layer: layers run one after another on the same stream
        self.workspace = alloc_decode_workspace(max_num_seqs, num_heads, head_dim, self.max_num_splits, device)
        logger.debug("triton attention: %d/%d heads, dim %d, splits %s (max %d)", num_heads, num_kv_heads,
                     head_dim, num_splits or "auto", self.max_num_splits)

    def num_splits_for(self, batch: int) -> int:
        """KV splits per sequence for a decode batch of ``batch`` sequences (shape-only choice)."""
        if self.fixed_splits is not None:
            return self.fixed_splits
        # few sequences leave SMs idle unless their KV is split; a full batch needs no split
        programs = batch * self.num_kv_heads
        if programs >= self.unsplit_programs:
            return 1
        want = -(-self.target_programs // max(1, programs))
        # a power of two: each count is a kernel variant, and eager decode compiles them all up front
        return max(1, min(self.max_num_splits, triton.next_power_of_2(want)))

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if meta.is_decode_only:
            batch = q.shape[0]
            num_splits = self.num_splits_for(batch)
            workspace = self.workspace if batch <= self.max_num_seqs else None  # fallback allocates
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                num_splits=num_splits, workspace=workspace, order=meta.decode_order,
                                k_scale=k_scale, v_scale=v_scale)
        return paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                             meta.query_start_loc, scale, k_scale=k_scale, v_scale=v_scale)
