"""Qwen2-MoE: Qwen2 attention (q/k/v bias), sparse expert blocks plus a shared expert scaled by a sigmoid gate."""
from __future__ import annotations

from typing import Any

from torch import nn

from nanovllm.layers.moe import SparseMoeBlock, is_sparse_layer, map_expert_weight
from nanovllm.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP


class Qwen2MoeForCausalLM(Qwen3ForCausalLM):
    qkv_bias = True
    qk_norm = False

    def make_layer(self, config: Any, layer_index: int) -> nn.Module:
        prefix = f"model.layers.{layer_index}"
        mlp = None
        if is_sparse_layer(config, layer_index):
            shared = Qwen3MLP(config.hidden_size, config.shared_expert_intermediate_size,
                              quant_config=self.quant_config, prefix=f"{prefix}.mlp.shared_expert")
            mlp = SparseMoeBlock(config, shared_expert=shared, quant_config=self.quant_config, prefix=f"{prefix}.mlp")
        return Qwen3DecoderLayer(config, self.qkv_bias, self.qk_norm, mlp=mlp, fast_path=self.fast_path,
                                 quant_config=self.quant_config, prefix=prefix)

    @staticmethod
    def map_expert_weight(param_name: str, shard_id: object) -> tuple[str, object]:
        return map_expert_weight(param_name, shard_id)
