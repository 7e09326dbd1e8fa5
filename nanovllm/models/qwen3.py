"""Qwen3 (and, through two switches, Qwen2): a decoder-only transformer with GQA, RoPE and SwiGLU.

Qwen3 normalises each head of q and k before RoPE and has no qkv bias; Qwen2 has the qkv bias and no q/k norm.
A model built with ``fast_path`` (CUDA, not ``enforce_eager``) runs its norms as compiled kernels and lets the two
projections that feed an add + RMSNorm hand it split-K partial sums. A ``quant_config`` (FP8 weights) reaches every
linear layer with the layer's checkpoint name (``prefix``), by which the config decides whether it is quantized.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention.layer import Attention
from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import LinearOutput, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.quantization import QuantConfig
from nanovllm.layers.rotary import RotaryEmbedding, rope_parameters


class Qwen3Attention(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool, o_bias: bool = False,
                 fast_path: bool = False, quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads, bias=qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias,
                                        defer_sum=fast_path, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, scale=head_dim**-0.5)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps, fused=fast_path)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps, fused=fast_path)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> LinearOutput:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else None
        return self.o_proj(self.attn(positions, q, k, v, self.rotary_emb, norms))


class Qwen3MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, defer_sum: bool = False,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, defer_sum=defer_sum,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> LinearOutput:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(
        self, config: Any, qkv_bias: bool, qk_norm: bool, o_bias: bool = False, mlp_bias: bool = False,
        mlp: nn.Module | None = None, fast_path: bool = False, quant_config: QuantConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        # both projections feed an add + RMSNorm (this layer's, the next layer's or the final norm)
        self.self_attn = Qwen3Attention(config, qkv_bias, qk_norm, o_bias, fast_path, quant_config,
                                        prefix=f"{prefix}.self_attn")
        # a mixture-of-experts model passes its sparse block here
        self.mlp = mlp if mlp is not None else Qwen3MLP(
            config.hidden_size, config.intermediate_size, mlp_bias, defer_sum=fast_path, quant_config=quant_config,
            prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, fused=fast_path)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, fused=fast_path)

    def forward(
        self, positions: torch.Tensor, hidden: LinearOutput, residual: torch.Tensor | None
    ) -> tuple[LinearOutput, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: Any, layer_factory: Any, fast_path: bool = False) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([layer_factory(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, fused=fast_path)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = True
    # checkpoint name -> (our parameter name, shard id) for weights we store packed
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, fast_path: bool = False, quant_config: QuantConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.fast_path = fast_path
        self.quant_config = quant_config
        self.model = Qwen3Model(config, self.make_layer, fast_path)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, config: Any, layer_index: int) -> nn.Module:
        return Qwen3DecoderLayer(config, self.qkv_bias, self.qk_norm, fast_path=self.fast_path,
                                 quant_config=self.quant_config, prefix=f"model.layers.{layer_index}")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
