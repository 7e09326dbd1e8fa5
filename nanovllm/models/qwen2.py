"""Qwen2: the Qwen3 architecture with a bias on q/k/v and no per-head q/k norm."""
from __future__ import annotations

from nanovllm.models.qwen3 import Qwen3ForCausalLM


class Qwen2ForCausalLM(Qwen3ForCausalLM):
    qkv_bias = True
    qk_norm = False
