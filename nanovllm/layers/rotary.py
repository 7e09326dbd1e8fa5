"""Rotary position embedding (the neox / rotate-half layout), with Llama 3's frequency scaling, linear position
scaling, and explicit per-frequency divisors (how GGUF files store Llama 3.1's scaling)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nanovllm.layers.attention.metadata import KVWrite


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings under either config spelling: ``rope_parameters`` (newer) or ``rope_theta`` +
    ``rope_scaling`` (older). Returns a dict with at least ``rope_theta`` and ``rope_type``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Slow down the low frequencies by ``factor``, keep the high ones, blend smoothly in between."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        base = float(params["rope_theta"])
        # computed on the CPU whatever the model's device, so every device gets the same table bit for bit
        device = torch.empty(0).device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        rope_type = params["rope_type"]
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        elif rope_type == "linear":  # positions divided by the factor
            inv_freq = inv_freq / float(params["factor"])
        elif rope_type == "freq_factors":
            inv_freq = inv_freq / torch.tensor(params["freq_factors"], dtype=torch.float32)
        elif rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3, linear, "
                             "freq_factors)")
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)
        # [max_position, head_dim]: cos of each frequency, then sin of each
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cos_sin.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, norms: tuple[Any, Any] | None = None,
        kv_write: KVWrite | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q``/``k`` (``[num_tokens, num_heads, head_dim]``), first normalising each head with ``norms``
        (QK-norm: two ``RMSNorm`` of ``head_dim``) if given. On CUDA both happen in place in one kernel, which
        with ``kv_write`` (CUDA only) also writes the rotated k and the v into the paged KV cache."""
        if q.is_cuda:
            from nanovllm.kernels.norm_rope import norm_rope_

            if norms is None:
                return norm_rope_(positions, q, k, self.cos_sin_cache, kv_write=kv_write)
            q_norm, k_norm = norms
            return norm_rope_(positions, q, k, self.cos_sin_cache, q_norm.weight, k_norm.weight, q_norm.eps,
                              kv_write=kv_write)
        assert kv_write is None, "the KV write is fused into the rotary kernel on CUDA only"
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
