"""The sparse mixture-of-experts block of Qwen2-MoE and Qwen3-MoE.

A router picks ``top_k`` experts per token; the experts' weights are stacked (``w13``: gate and up, ``w2``: down)
so that one fused kernel runs them all on CUDA (``kernels/fused_moe.py``), and the loop-over-experts reference runs
them elsewhere. Under tensor parallelism every rank holds a slice of each expert's intermediate dimension and the
partial outputs are summed, as for a row-parallel linear. Qwen2-MoE adds a dense shared expert scaled by a gate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.layers.moe_ops import moe_reference, select_experts


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool) -> None:
        super().__init__()
        tp_size = get_tp_size()
        if intermediate_size % tp_size:
            raise ValueError(
                f"moe_intermediate_size ({intermediate_size}) is not divisible by tensor_parallel_size ({tp_size})"
            )
        self.top_k = top_k
        self.renormalize = renormalize
        self.tp_rank = get_tp_rank()
        self.intermediate = intermediate_size // tp_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int | None]) -> None:
        """``shard_id``: (expert, 0 for gate / 1 for up) into ``w13``, (expert, None) for down into ``w2``."""
        expert, part = shard_id
        size = self.intermediate
        if part is None:  # down_proj [H, I]: this rank's columns
            param.data[expert].copy_(loaded.narrow(1, self.tp_rank * size, size))
        else:  # gate_proj / up_proj [I, H]: this rank's rows, into the gate or the up half
            param.data[expert].narrow(0, part * size, size).copy_(loaded.narrow(0, self.tp_rank * size, size))

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        if hidden.is_cuda:
            from nanovllm.kernels.fused_moe import fused_moe

            out = fused_moe(hidden, self.w13, self.w2, weights, ids)
        else:
            out = moe_reference(hidden, self.w13, self.w2, weights, ids)
        return tensor_model_parallel_all_reduce(out)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ an optional gated shared expert, built by the caller so it can be a plain MLP)."""

    def __init__(self, config: Any, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, bool(getattr(config, "norm_topk_prob", False)))
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out


def is_sparse_layer(config: Any, layer_index: int) -> bool:
    """The Qwen MoE rule: every ``decoder_sparse_step``-th layer is sparse, except those in ``mlp_only_layers``."""
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 0)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_index not in (getattr(config, "mlp_only_layers", None) or [])
        and num_experts > 0
        and (layer_index + 1) % step == 0
    )


_EXPERT_PARTS = {"gate_up_proj": ("w13", True), "down_proj": ("w2", False)}


def map_expert_weight(param_name: str, shard_id: object) -> tuple[str, object]:
    """``...experts.{e}.gate_up_proj.weight`` (shard 0/1 after the packed mapping) -> ``...experts.w13``, (e, shard);
    ``...experts.{e}.down_proj.weight`` -> ``...experts.w2``, (e, None). Other names pass through."""
    head, sep, tail = param_name.partition(".experts.")
    if not sep:
        return param_name, shard_id
    expert, _, rest = tail.partition(".")
    part = rest.removesuffix(".weight")
    if not expert.isdigit() or part not in _EXPERT_PARTS:
        return param_name, shard_id
    name, packed = _EXPERT_PARTS[part]
    return f"{head}.experts.{name}", (int(expert), shard_id if packed else None)
