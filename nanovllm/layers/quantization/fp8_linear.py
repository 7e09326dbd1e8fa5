"""FP8 weights of one linear layer: its parameters, how checkpoint tensors (or bf16 weights, quantized here) land in
them under tensor parallelism, and its forward.

Parameters: ``weight`` (float8_e4m3fn, ``[out, in]`` of this rank), the weight scales (float32, under the
checkpoint's name: ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]`` for blocks, ``weight_scale`` ``[out]``
otherwise) and, for static activations, ``input_scale`` (one float32). Each has the layer's ``weight_loader``, which
hands the layer's geometry (``layers/linear.py``: which rows and columns of the checkpoint tensor are this rank's,
and where a merged layer's part goes) to ``load``:

- the weight: those rows and columns, as stored; or, quantizing at load, one scale per output row from the whole
  row (every rank of a row-parallel layer gets the same scales) and this rank's columns divided by it;
- block scales: the same rows and columns in units of 128 (the shard boundaries must fall on 128-blocks, checked
  when the layer is built); per-channel scales: the rows, whole on every rank of a row-parallel layer; a per-tensor
  scale: repeated over its part's rows; ``input_scale``: the largest over a merged layer's parts.

After loading, ``process_after_loading`` picks the forward. On a GPU with FP8 tensor cores the weights stay FP8
(``fp8_gemm.py``: block scales from compute capability 8.9, per-channel ones through ``torch._scaled_mm`` from 9.0).
Elsewhere (the CPU, older GPUs) the weight is dequantized to the compute dtype once, here: a
forward then costs what an unquantized one does, where dequantizing per forward would read and convert every weight
each step; activations are not quantized on this path (the layer computes as W8A16; static ``input_scale`` s are
used only by the GPU path).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import is_fp8
import nanovllm.layers.quantization.fp8_gemm as fp8_gemm  # the module, not the package (which imports this one)
from nanovllm.layers.quantization.config import BLOCK, Fp8Scheme
from nanovllm.layers.quantization.fp8_formats import FP8_DTYPE, block_grid, dequantize, scale_from_amax, to_fp8

logger = logging.getLogger(__name__)


def block_aligned(shard: Any, block: int) -> bool:
    """Whether a shard's rows (or columns) start on a block and end on one, or at the end of both tensors."""
    ends = shard.dst + shard.size == shard.dst_total and shard.src + shard.size == shard.src_total
    return shard.dst % block == 0 and shard.src % block == 0 and (shard.size % block == 0 or ends)


def _blocks(start: int, size: int, block: int) -> slice:
    return slice(start // block, -(-(start + size) // block))


class Fp8LinearMethod:
    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme
        self.backend: str | None = None  # set by process_after_loading
        self.compute_dtype = torch.get_default_dtype()
        self._scale_row: torch.Tensor | None = None
        self._scaled_mm_scale: torch.Tensor | None = None

    # ---- parameters -------------------------------------------------------------------------------------------

    def create_weights(self, layer: nn.Module) -> None:
        out, inp = layer.output_size, layer.input_size
        layer.weight = nn.Parameter(torch.empty(out, inp, dtype=FP8_DTYPE), requires_grad=False)
        shape = block_grid(out, inp, BLOCK) if self.scheme.block else (out,)
        layer.register_parameter(self.scheme.scale_name,
                                 nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False))
        params = [layer.weight, self.weight_scale(layer)]
        # quantizing at load, the scales come with the weight: no checkpoint tensor of their own
        self.weight_scale(layer).filled_by_weight = not self.scheme.serialized
        if self.scheme.activation == "static_tensor":
            layer.input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
            params.append(layer.input_scale)
        for param in params:
            param.weight_loader = layer.weight_loader
        if self.scheme.block:
            self._check_blocks(layer)

    def weight_scale(self, layer: nn.Module) -> nn.Parameter:
        return getattr(layer, self.scheme.scale_name)

    def _check_blocks(self, layer: nn.Module) -> None:
        shards = [("rows", sid, layer.output_shard(sid)) for sid in layer.shard_ids()]
        shards.append(("columns", None, layer.input_shard()))
        for what, sid, shard in shards:
            if not block_aligned(shard, BLOCK[0]):
                part = f" part {sid}" if sid is not None else ""
                raise ValueError(
                    f"{layer.prefix or type(layer).__name__}{part}: FP8 block scales need the tensor-parallel shard "
                    f"boundaries on {BLOCK[0]}-blocks, but this rank takes {what} [{shard.src}, "
                    f"{shard.src + shard.size}) of {shard.src_total} into [{shard.dst}, {shard.dst + shard.size}) "
                    f"(tensor_parallel_size={layer.tp_size}); pick a tensor_parallel_size that splits on 128-blocks")

    # ---- loading ----------------------------------------------------------------------------------------------

    def load(self, layer: nn.Module, param: nn.Parameter, loaded: Any, out: Any, cols: Any) -> None:
        """Copy this rank's part of ``loaded`` into ``param``; ``out``/``cols``: the layer's ``Shard`` s."""
        rows = slice(out.src, out.src + out.size)
        if param is layer.weight:
            self._load_weight(layer, loaded, out, cols)
        elif param is getattr(layer, "input_scale", None):
            param.data.copy_(torch.maximum(param.data, loaded.float().reshape(())))
        elif self.scheme.block:
            block = BLOCK[0]
            param.data[_blocks(out.dst, out.size, block), _blocks(cols.dst, cols.size, block)] = \
                loaded[_blocks(out.src, out.size, block), _blocks(cols.src, cols.size, block)]
        elif self.scheme.weight == "tensor":
            param.data.narrow(0, out.dst, out.size).fill_(loaded.float().reshape(-1)[0])
        else:  # per channel, stored [out, 1]
            param.data.narrow(0, out.dst, out.size).copy_(loaded[rows].reshape(-1))

    def _load_weight(self, layer: nn.Module, loaded: Any, out: Any, cols: Any) -> None:
        rows = slice(out.src, out.src + out.size)
        mine = slice(cols.src, cols.src + cols.size)
        dst = layer.weight.data.narrow(0, out.dst, out.size)
        if self.scheme.serialized:
            values = loaded[rows, mine]
            if values.dtype != FP8_DTYPE:
                raise ValueError(f"{layer.prefix}: the checkpoint's weight is {values.dtype}, but its "
                                 f"quantization_config makes this layer FP8 ({self.scheme.weight} scales)")
            dst.copy_(values)
            return
        # online: each output row's scale comes from the whole row (the same on every rank), computed on the device
        whole = loaded[rows, :].to(dst.device)
        if not whole.is_floating_point() or is_fp8(whole.dtype):
            raise ValueError(f"{layer.prefix}: quantization='fp8' quantizes floating-point weights, but the "
                             f"checkpoint's are {whole.dtype} without a quantization_config")
        scale = scale_from_amax(whole.abs().amax(dim=1))
        dst.copy_(to_fp8(whole[:, mine], scale[:, None]))
        self.weight_scale(layer).data.narrow(0, out.dst, out.size).copy_(scale)

    @torch.no_grad()
    def init_dummy(self, layer: nn.Module, generator: torch.Generator, low: float, high: float) -> None:
        """Random weights for ``load_format="dummy"``: uniform values, quantized in this layer's format."""
        from nanovllm.layers.quantization.fp8_formats import quantize_block, quantize_per_channel

        values = torch.empty(layer.weight.shape, device=layer.weight.device).uniform_(low, high, generator=generator)
        q, scale = quantize_block(values) if self.scheme.block else quantize_per_channel(values)
        layer.weight.data.copy_(q)
        self.weight_scale(layer).data.copy_(scale)
        if self.scheme.activation == "static_tensor":
            layer.input_scale.data.fill_(1.0 / 448.0)  # activations of magnitude up to 1

    # ---- after loading: the forward -----------------------------------------------------------------------------

    def process_after_loading(self, layer: nn.Module) -> None:
        weight, scale = layer.weight, self.weight_scale(layer)
        if self.scheme.activation == "static_tensor" and not float(layer.input_scale) > 0:
            raise ValueError(f"{layer.prefix}: the checkpoint has no positive input_scale for static activations")
        device = weight.device
        n, k = weight.shape
        if fp8_gemm.fp8_supported(device) and self.scheme.block:
            self.backend = fp8_gemm.BLOCK_BACKEND
            if self.backend == "scaled_mm":
                self._scaled_mm_scale = fp8_gemm.block_scale_for_scaled_mm(scale.data)
        elif fp8_gemm.rowwise_supported(device) and fp8_gemm.rowwise_shapes_ok(n, k):
            self.backend = "rowwise"
            self._scale_row = scale.data.view(1, n)
        else:
            self.backend = "dequantized"
            layer.register_buffer("weight_dequantized", dequantize(weight.data, scale.data, self.scheme.block,
                                                                   self.compute_dtype), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.backend == "dequantized":
            return F.linear(x, layer.weight_dequantized, bias)
        if self.backend is None:
            raise RuntimeError(f"{layer.prefix}: FP8 layer run before its weights were loaded")
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self.backend == "rowwise":
            input_scale = layer.input_scale if self.scheme.activation == "static_tensor" else None
            out = fp8_gemm.rowwise_linear(x2, layer.weight, self._scale_row, input_scale)
        else:
            out = fp8_gemm.block_linear(x2, layer.weight, self.weight_scale(layer), self.backend,
                                        self._scaled_mm_scale)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out
