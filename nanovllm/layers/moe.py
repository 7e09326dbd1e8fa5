"""The sparse mixture-of-experts block of Qwen2-MoE and Qwen3-MoE.

A router picks ``top_k`` experts per token; the experts' weights are stacked (``w13``: gate and up, ``w2``: down)
so that one fused kernel runs them all on CUDA (``kernels/fused_moe.py``), and the loop-over-experts reference runs
them elsewhere. Under tensor parallelism every rank holds a slice of each expert's intermediate dimension and the
partial outputs are summed, as for a row-parallel linear. Qwen2-MoE adds a dense shared expert scaled by a gate.
Experts may hold FP8 weights (``layers/quantization/fp8_moe.py``); the routers stay unquantized, as publishers
leave them (a checkpoint with FP8 router weights is a loading error).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanovllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from nanovllm.kernels import is_fp8
from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.layers.moe_ops import moe_reference, select_experts
from nanovllm.layers.quantization import QuantConfig
from nanovllm.layers.quantization.fp8_moe import Fp8MoEMethod


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        """``prefix``: this module's name (``model.layers.N.mlp.experts``), which the quantization config is asked
        about as its experts' checkpoint modules."""
        super().__init__()
        tp_size = get_tp_size()
        if intermediate_size % tp_size:
            raise ValueError(
                f"moe_intermediate_size ({intermediate_size}) is not divisible by tensor_parallel_size ({tp_size})"
            )
        self.top_k = top_k
        self.renormalize = renormalize
        self.tp_rank = get_tp_rank()
        self.tp_size = tp_size
        self.prefix = prefix
        self.intermediate = intermediate_size // tp_size
        names = [f"{prefix}.0.{part}" for part in ("gate_proj", "up_proj", "down_proj")]
        scheme = quant_config.scheme_for(names) if quant_config is not None else None
        self.quant_method = Fp8MoEMethod(scheme) if scheme is not None else None
        if self.quant_method is not None:
            self.quant_method.create_weights(self, num_experts, hidden_size, self.intermediate)
            return
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int | None]) -> None:
        """``shard_id``: (expert, 0 for gate / 1 for up) into ``w13``, (expert, None) for down into ``w2``
        (and into their scales, for FP8 experts)."""
        expert, part = shard_id
        if self.quant_method is not None:
            self.quant_method.load(self, param, loaded, expert, part)
            return
        size = self.intermediate
        if part is None:  # down_proj [H, I]: this rank's columns
            values = loaded[:, self.tp_rank * size:(self.tp_rank + 1) * size]
            _check_not_fp8(values, self.prefix)
            param.data[expert].copy_(values)
        else:  # gate_proj / up_proj [I, H]: this rank's rows, into the gate or the up half
            values = loaded[self.tp_rank * size:(self.tp_rank + 1) * size]
            _check_not_fp8(values, self.prefix)
            param.data[expert].narrow(0, part * size, size).copy_(values)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        w13, w2, scales = (self.w13, self.w2, {}) if self.quant_method is None else self.quant_method.weights(self)
        if hidden.is_cuda:
            from nanovllm.kernels.fused_moe import fused_moe

            out = fused_moe(hidden, w13, w2, weights, ids, **scales)
        else:
            out = moe_reference(hidden, w13, w2, weights, ids)
        return tensor_model_parallel_all_reduce(out)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ an optional gated shared expert, built by the caller so it can be a plain MLP)."""

    def __init__(self, config: Any, shared_expert: nn.Module | None = None, quant_config: QuantConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False, prefix=f"{prefix}.gate")
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, bool(getattr(config, "norm_topk_prob", False)),
                                quant_config, prefix=f"{prefix}.experts")
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False,
                                                       prefix=f"{prefix}.shared_expert_gate")

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
    ``...experts.{e}.down_proj.weight`` -> ``...experts.w2``, (e, None); an FP8 expert's other tensors
    (``weight_scale_inv``, ``weight_scale``, ``input_scale``) -> ``...experts.w13_weight_scale_inv`` and so on.
    Other names pass through."""
    head, sep, tail = param_name.partition(".experts.")
    if not sep:
        return param_name, shard_id
    expert, _, rest = tail.partition(".")
    part, _, suffix = rest.partition(".")
    if not expert.isdigit() or part not in _EXPERT_PARTS or not suffix:
        return param_name, shard_id
    name, packed = _EXPERT_PARTS[part]
    param = name if suffix == "weight" else f"{name}_{suffix}"
    return f"{head}.experts.{param}", (int(expert), shard_id if packed else None)


def _check_not_fp8(values: torch.Tensor, prefix: str) -> None:
    if is_fp8(values.dtype):
        raise ValueError(f"checkpoint holds FP8 expert weights for {prefix}, which its quantization_config leaves "
                         "unquantized")
