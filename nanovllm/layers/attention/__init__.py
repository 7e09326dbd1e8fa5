"""Attention backends behind one interface; ``make_attention_backend`` picks one for a device."""
from __future__ import annotations

import logging
from typing import Any

import torch

from nanovllm.layers.attention.base import AttentionBackend
from nanovllm.layers.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)


def make_attention_backend(name: str, device: torch.device, layer: Any, config: Any) -> AttentionBackend:
    """``auto`` is Triton on CUDA when Triton imports, else the torch reference."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; use 'torch' on {device.type}")
    from nanovllm.layers.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(
        num_heads=layer.num_heads,
        num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_dim,
        max_num_seqs=config.max_num_seqs,
        device=device,
    )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.warning("triton is not importable; using the torch attention backend")
        return False
    return True


__all__ = ["AttentionBackend", "TorchAttentionBackend", "make_attention_backend"]
