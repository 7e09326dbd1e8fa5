"""Llama 2 and Llama 3.x: the Qwen3 block without the per-head q/k norm, biases as the config says.

Everything that differs between Llama generations lives in the config: GQA (or none: as many KV heads as query
heads), ``rope_theta``, and Llama 3's ``llama3`` rope scaling, which ``layers/rotary.py`` applies.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from nanovllm.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM


class LlamaForCausalLM(Qwen3ForCausalLM):
    qk_norm = False

    def make_layer(self, config: Any, layer_index: int) -> nn.Module:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return Qwen3DecoderLayer(
            config, qkv_bias=attention_bias, qk_norm=False, o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)), fast_path=self.fast_path,
            quant_config=self.quant_config, prefix=f"model.layers.{layer_index}",
        )
