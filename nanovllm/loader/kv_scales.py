"""FP8 KV-cache scales stored in a checkpoint, into the attention layers' ``k_scale`` / ``v_scale``.

Publishers spell them three ways: ``<attention>.k_scale`` and ``.v_scale`` (compressed-tensors, Hugging Face FP8),
``<attention>.k_proj.output_scale`` and ``.v_proj.output_scale`` (an output-activation scale of the projection), and
one ``<attention>.kv_scale`` for both (older FP8 exports). ``<attention>`` is the checkpoint's attention module
(``model.layers.N.self_attn``); ours sits somewhere under it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.layers.attention.layer import Attention

_SUFFIXES = {".k_scale": ("k_scale",), ".v_scale": ("v_scale",), ".k_proj.output_scale": ("k_scale",),
             ".v_proj.output_scale": ("v_scale",), ".kv_scale": ("k_scale", "v_scale")}


def kv_scale_targets(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(checkpoint attention prefix, our buffers it sets) when ``name`` is a KV-cache scale, else None."""
    for suffix, buffers in _SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], buffers
    return None


def load_kv_scale(model: nn.Module, name: str, tensor: Any) -> bool:
    """Copy a KV-cache scale into the attention layer under its prefix; False when ``name`` is none (or belongs to a
    layer another pipeline stage owns)."""
    target = kv_scale_targets(name)
    if target is None:
        return False
    prefix, buffers = target
    layers = [m for path, m in model.named_modules() if isinstance(m, Attention) and path.startswith(prefix + ".")]
    if len(layers) != 1:
        if getattr(model, "is_pipeline_stage", False):
            return True  # a layer another stage owns
        raise ValueError(f"checkpoint tensor {name!r} is a KV-cache scale, but no attention layer sits under {prefix!r}")
    value = (tensor.materialize() if hasattr(tensor, "materialize") else torch.as_tensor(tensor)).float()
    if value.numel() != 1:
        raise ValueError(f"checkpoint tensor {name!r}: a KV-cache scale must be one number, got shape "
                         f"{tuple(value.shape)} (per-head scales are not supported)")
    for buffer in buffers:
        getattr(layers[0], buffer).copy_(value.reshape(1))
    return True
