"""Linear layers that know how they are split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice, no communication); row-parallel layers
split the input features and all-reduce the partial sums. At world size 1 both are plain linears. Each parameter
carries a ``weight_loader(param, checkpoint_tensor, shard_id)`` that copies this rank's slice of a checkpoint tensor
into it, so the loader never needs to know the layout.

A row-parallel linear built with ``defer_sum`` (its output goes straight into an add + RMSNorm, and the model is
built for the GPU fast path) may return ``PartialSums`` at decode sizes (see ``kernels/split_k.py``): splitting K
fills the GPU, and the norm adds the splits up.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None) -> None:
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if self.tp_dim is not None and param.dim() > self.tp_dim and self.tp_size > 1:
            size = param.shape[self.tp_dim]
            loaded = loaded.narrow(self.tp_dim, self.tp_rank * size, size)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        tp_size = get_tp_size()
        super().__init__(input_size, _divide(output_size, tp_size, "output size"), bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored side by side (gate_proj and up_proj as one gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int), "a merged linear loads one named part at a time"
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        loaded = loaded.narrow(0, self.tp_rank * shard_size, shard_size)
        param.data.narrow(0, offset, shard_size).copy_(loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one matmul. KV heads are replicated when there are fewer of them than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size * tp_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, rank * size, size))


@dataclasses.dataclass
class PartialSums:
    """A linear's output as fp32 partial products over slices of its input features, ``[splits, tokens, out]``;
    only an add + RMSNorm (``RMSNorm.forward`` with a residual) or ``materialize`` consumes it."""

    partials: torch.Tensor
    dtype: torch.dtype

    def materialize(self) -> torch.Tensor:
        return self.partials.sum(0).to(self.dtype)


# What a row-parallel linear returns: a tensor, or (``defer_sum``) partial sums that only an add + RMSNorm or
# ``as_tensor`` consumes.
LinearOutput = torch.Tensor | PartialSums


def as_tensor(x: LinearOutput) -> torch.Tensor:
    return x.materialize() if isinstance(x, PartialSums) else x


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, defer_sum: bool = False) -> None:
        """``defer_sum``: the output feeds an add + RMSNorm that takes partial sums, on the fast path; honoured on
        one rank, without a bias."""
        tp_size = get_tp_size()
        super().__init__(_divide(input_size, tp_size, "input size"), output_size, bias, tp_dim=1)
        self.defer_sum = defer_sum and self.tp_size == 1 and not bias

    def split_k_plan(self, x: torch.Tensor) -> object | None:
        if not (self.defer_sum and x.is_cuda):
            return None
        from nanovllm.kernels.split_k import plan_for

        return plan_for(x, self.weight)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the all-reduce
            param.data.copy_(loaded)
            return
        super().weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> LinearOutput:
        plan = self.split_k_plan(x)
        if plan is not None:
            from nanovllm.kernels.split_k import split_k_matmul

            return PartialSums(split_k_matmul(x, self.weight, plan), x.dtype)
        out = F.linear(x, self.weight)
        out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
