"""Linear layers that know how they are split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice, no communication); row-parallel layers
split the input features and all-reduce the partial sums. At world size 1 both are plain linears. Each parameter
carries a ``weight_loader(param, checkpoint_tensor, shard_id)`` that copies this rank's slice of a checkpoint tensor
into it, so the loader never needs to know the layout. Where that slice lies is the layer's geometry: which rows of a
checkpoint tensor (a merged layer's part ``shard_id``) land on which of this rank's output rows (``output_shard``),
and which input columns this rank holds (``input_shard``).

A layer built with an FP8 ``Fp8Scheme`` (``layers/quantization``) keeps float8_e4m3fn weights and their scales; the
same geometry places the scales (block scales in 128-blocks of it), and the scheme's method runs the GEMM.

A row-parallel linear built with ``defer_sum`` (its output goes straight into an add + RMSNorm, and the model is
built for the GPU fast path) may return ``PartialSums`` at decode sizes (see ``kernels/split_k.py``): splitting K
fills the GPU, and the norm adds the splits up. FP8 layers do not: their GEMM is the FP8 one.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from nanovllm.kernels import is_fp8
from nanovllm.layers.quantization import Fp8LinearMethod, QuantConfig, module_names


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows (or columns) ``[src, src + size)`` of a checkpoint tensor of ``src_total`` land at ``[dst, dst + size)``
    of this rank's ``dst_total``."""

    dst: int
    size: int
    src: int
    src_total: int
    dst_total: int


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.input_size = input_size  # this rank's
        self.output_size = output_size
        self.prefix = prefix
        scheme = quant_config.scheme_for(module_names(prefix)) if quant_config is not None else None
        self.quant_method = Fp8LinearMethod(scheme) if scheme is not None else None
        if self.quant_method is None:
            self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    # ---- geometry ---------------------------------------------------------------------------------------------

    def shard_ids(self) -> list[object]:
        """The checkpoint tensors (parts) one parameter of this layer is loaded from."""
        return [None]

    def output_shard(self, shard_id: object) -> Shard:
        if self.tp_dim == 0:
            return Shard(0, self.output_size, self.tp_rank * self.output_size, self.output_size * self.tp_size,
                         self.output_size)
        return Shard(0, self.output_size, 0, self.output_size, self.output_size)

    def input_shard(self) -> Shard:
        if self.tp_dim == 1:
            return Shard(0, self.input_size, self.tp_rank * self.input_size, self.input_size * self.tp_size,
                         self.input_size)
        return Shard(0, self.input_size, 0, self.input_size, self.input_size)

    # ---- loading ----------------------------------------------------------------------------------------------

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        out = self.output_shard(shard_id)
        if param is self.bias:  # a row-parallel bias is whole on every rank: it is added once, after the all-reduce
            param.data.narrow(0, out.dst, out.size).copy_(loaded[out.src:out.src + out.size])
        elif self.quant_method is not None:
            self.quant_method.load(self, param, loaded, out, self.input_shard())
        else:
            cols = self.input_shard()
            values = loaded[out.src:out.src + out.size, cols.src:cols.src + cols.size]
            _check_not_fp8(values, self.prefix)
            param.data.narrow(0, out.dst, out.size).copy_(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)


def _check_not_fp8(loaded: torch.Tensor, prefix: str) -> None:
    if is_fp8(loaded.dtype):
        raise ValueError(f"checkpoint holds FP8 weights for {prefix or 'a layer'}, which its quantization_config "
                         "leaves unquantized")


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__(input_size, output_size, bias, None, quant_config, prefix)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        tp_size = get_tp_size()
        super().__init__(input_size, _divide(output_size, tp_size, "output size"), bias, 0, quant_config, prefix)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored side by side (gate_proj and up_proj as one gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefix)

    def shard_ids(self) -> list[object]:
        return list(range(len(self.output_sizes)))

    def output_shard(self, shard_id: object) -> Shard:
        assert isinstance(shard_id, int), "a merged linear loads one named part at a time"
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return Shard(offset, size, self.tp_rank * size, self.output_sizes[shard_id], self.output_size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections as one matmul. KV heads are replicated when there are fewer of them than ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size * tp_size, bias, quant_config, prefix)

    def shard_ids(self) -> list[object]:
        return ["q", "k", "v"]

    def output_shard(self, shard_id: object) -> Shard:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return Shard(0, q_size, self.tp_rank * q_size, self.total_num_heads * self.head_dim, self.output_size)
        if shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            rank = self.tp_rank // self.kv_replicas
            return Shard(offset, kv_size, rank * kv_size, self.total_num_kv_heads * self.head_dim, self.output_size)
        raise ValueError(f"unknown qkv shard {shard_id!r}")


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
    def __init__(self, input_size: int, output_size: int, bias: bool = False, defer_sum: bool = False,
                 quant_config: QuantConfig | None = None, prefix: str = "") -> None:
        """``defer_sum``: the output feeds an add + RMSNorm that takes partial sums, on the fast path; honoured on
        one rank, without a bias, for unquantized weights (an FP8 layer runs its own GEMM)."""
        tp_size = get_tp_size()
        super().__init__(_divide(input_size, tp_size, "input size"), output_size, bias, 1, quant_config, prefix)
        self.defer_sum = defer_sum and self.tp_size == 1 and not bias and self.quant_method is None

    def split_k_plan(self, x: torch.Tensor) -> object | None:
        if not (self.defer_sum and x.is_cuda):
            return None
        from nanovllm.kernels.split_k import plan_for

        return plan_for(x, self.weight)

    def forward(self, x: torch.Tensor) -> LinearOutput:
        plan = self.split_k_plan(x)
        if plan is not None:
            from nanovllm.kernels.split_k import split_k_matmul

            return PartialSums(split_k_matmul(x, self.weight, plan), x.dtype)
        if self.quant_method is not None:
            out = self.quant_method.apply(self, x, None)
        else:
            out = F.linear(x, self.weight)
        out = tensor_model_parallel_all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
