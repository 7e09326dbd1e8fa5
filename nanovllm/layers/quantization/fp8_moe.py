"""FP8 weights of the stacked MoE experts (``layers/moe.py``'s ``FusedMoE``): parameters, loading, and which forward.

Parameters: ``w13`` ``[E, 2*I, H]`` and ``w2`` ``[E, H, I]`` in float8_e4m3fn (``I``: this rank's slice of the
intermediate size), their scales as ``w13_<scale name>`` / ``w2_<scale name>`` (128x128 blocks
``[E, 2*I/128, H/128]`` / ``[E, H/128, I/128]``, or per output channel ``[E, 2*I]`` / ``[E, H]``; a per-tensor scale
is held per channel) and, for static activations, ``w13_input_scale`` / ``w2_input_scale`` (the largest over the
experts). Under tensor parallelism an expert's gate and up rows and its down columns are split like its weights;
with block scales each rank's slice of the intermediate size must be a multiple of 128.

Forward: on a GPU with FP8 tensor cores, block-scaled experts run in the fused MoE kernel (``kernels/fused_moe.py``,
activations quantized per token and 128-column group inside it). Other FP8 experts, and every FP8 expert on the CPU,
are dequantized to the compute dtype once, after loading (on a GPU their FP8 copy is then freed, so the model holds
the dequantized weights only; activations are not quantized on this path).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from nanovllm.kernels import is_fp8
from nanovllm.layers.quantization import fp8_gemm
from nanovllm.layers.quantization.config import BLOCK, Fp8Scheme
from nanovllm.layers.quantization.fp8_formats import FP8_DTYPE, block_grid, dequantize, scale_from_amax, to_fp8

logger = logging.getLogger(__name__)


class Fp8MoEMethod:
    def __init__(self, scheme: Fp8Scheme) -> None:
        self.scheme = scheme
        self.backend: str | None = None
        self.compute_dtype = torch.get_default_dtype()

    def scale_name(self, which: str) -> str:
        return f"{which}_{self.scheme.scale_name}"

    def create_weights(self, moe: nn.Module, num_experts: int, hidden: int, inter: int) -> None:
        if self.scheme.block and inter % BLOCK[0]:
            raise ValueError(f"{moe.prefix}: FP8 block scales need each rank's slice of moe_intermediate_size on "
                             f"128-blocks, got {inter} (tensor_parallel_size={moe.tp_size})")
        shapes = {"w13": (2 * inter, hidden), "w2": (hidden, inter)}
        for which, (rows, cols) in shapes.items():
            weight = nn.Parameter(torch.empty(num_experts, rows, cols, dtype=FP8_DTYPE), requires_grad=False)
            scale_shape = block_grid(rows, cols, BLOCK) if self.scheme.block else (rows,)
            scale = nn.Parameter(torch.ones(num_experts, *scale_shape, dtype=torch.float32), requires_grad=False)
            scale.filled_by_weight = not self.scheme.serialized
            moe.register_parameter(which, weight)
            moe.register_parameter(self.scale_name(which), scale)
            params = [weight, scale]
            if self.scheme.activation == "static_tensor":
                input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
                moe.register_parameter(f"{which}_input_scale", input_scale)
                params.append(input_scale)
            for param in params:
                param.weight_loader = moe.weight_loader

    # ---- loading ----------------------------------------------------------------------------------------------

    def load(self, moe: nn.Module, param: nn.Parameter, loaded: Any, expert: int, part: int | None) -> None:
        """One expert's gate (part 0), up (part 1) or down (part None) tensor, or its scale, into ``param``."""
        size, rank = moe.intermediate, moe.tp_rank
        if part is None:  # down [H, I]: this rank's columns
            which, rows, cols, dst_rows = "w2", slice(None), slice(rank * size, (rank + 1) * size), slice(None)
        else:  # gate / up [I, H]: this rank's rows, into the gate or the up half
            which, rows, cols = "w13", slice(rank * size, (rank + 1) * size), slice(None)
            dst_rows = slice(part * size, (part + 1) * size)
        if param is getattr(moe, which):
            self._load_weight(moe, which, loaded, expert, rows, cols, dst_rows)
        elif param is getattr(moe, f"{which}_input_scale", None):
            param.data.copy_(torch.maximum(param.data, loaded.float().reshape(())))
        elif self.scheme.block:
            param.data[expert][_blocks(dst_rows), _blocks(slice(None))] = loaded[_blocks(rows), _blocks(cols)]
        elif self.scheme.weight == "tensor":
            param.data[expert][dst_rows] = loaded.float().reshape(-1)[0]
        else:
            param.data[expert][dst_rows] = loaded[rows].reshape(-1)

    def _load_weight(self, moe: nn.Module, which: str, loaded: Any, expert: int, rows: slice, cols: slice,
                     dst_rows: slice) -> None:
        dst = getattr(moe, which).data[expert][dst_rows]
        if self.scheme.serialized:
            values = loaded[rows, cols]
            if values.dtype != FP8_DTYPE:
                raise ValueError(f"{moe.prefix}: the checkpoint's expert weight is {values.dtype}, but its "
                                 "quantization_config makes the experts FP8")
            dst.copy_(values)
            return
        whole = loaded[rows, :].to(dst.device)  # online: scales from whole rows, the same on every rank
        if not whole.is_floating_point() or is_fp8(whole.dtype):
            raise ValueError(f"{moe.prefix}: quantization='fp8' quantizes floating-point weights, got {whole.dtype}")
        scale = scale_from_amax(whole.abs().amax(dim=1))
        dst.copy_(to_fp8(whole[:, cols], scale[:, None]))
        getattr(moe, self.scale_name(which)).data[expert][dst_rows] = scale

    @torch.no_grad()
    def init_dummy(self, moe: nn.Module, generator: torch.Generator, low: float, high: float) -> None:
        from nanovllm.layers.quantization.fp8_formats import quantize_block, quantize_per_channel

        for which in ("w13", "w2"):
            weight = getattr(moe, which)
            values = torch.empty(weight.shape, device=weight.device).uniform_(low, high, generator=generator)
            q, scale = quantize_block(values) if self.scheme.block else quantize_per_channel(values)
            weight.data.copy_(q)
            getattr(moe, self.scale_name(which)).data.copy_(scale)
            if self.scheme.activation == "static_tensor":
                getattr(moe, f"{which}_input_scale").data.fill_(1.0 / 448.0)

    # ---- after loading ----------------------------------------------------------------------------------------

    def process_after_loading(self, moe: nn.Module) -> None:
        device = moe.w13.device
        if self.scheme.block and fp8_gemm.fp8_supported(device):
            self.backend = "fused_fp8"
            return
        self.backend = "dequantized"
        for which in ("w13", "w2"):
            weight, scale = getattr(moe, which), getattr(moe, self.scale_name(which))
            moe.register_buffer(f"{which}_dequantized",
                                dequantize(weight.data, scale.data, self.scheme.block, self.compute_dtype),
                                persistent=False)
            if device.type == "cuda":  # the GPU holds one copy: the dequantized one
                weight.data = weight.data.new_empty(0)
        if device.type == "cuda":
            logger.info("%s: FP8 experts (%s scales) dequantized to %s at load", moe.prefix, self.scheme.weight,
                        self.compute_dtype)

    def weights(self, moe: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(w13, w2, the fused kernel's scale arguments) for the forward."""
        if self.backend == "dequantized":
            return moe.w13_dequantized, moe.w2_dequantized, {}
        if self.backend is None:
            raise RuntimeError(f"{moe.prefix}: FP8 experts run before their weights were loaded")
        return moe.w13, moe.w2, {"w13_scale": getattr(moe, self.scale_name("w13")),
                                 "w2_scale": getattr(moe, self.scale_name("w2"))}


def _blocks(span: slice) -> slice:
    """Rows or columns ``span`` (None bounds: the whole tensor) in units of 128-blocks."""
    start = None if span.start is None else span.start // BLOCK[0]
    stop = None if span.stop is None else -(-span.stop // BLOCK[0])
    return slice(start, stop)
