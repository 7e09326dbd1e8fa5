"""FP8 (``float8_e4m3fn``) weights and activations: quantize and dequantize in plain torch.

Every scale here is a *dequantization* multiplier: ``value ~= fp8.float() * scale`` with ``scale = amax / 448``
(448 is the largest finite e4m3fn value), so quantizing is ``(value / scale).clamp(-448, 448).to(fp8)``.
The weight layouts of the publishers' formats:

- **per output channel** ``[out]``: compressed-tensors ``strategy: channel`` (stored ``[out, 1]``) and the
  online quantization of ``quantization="fp8"``;
- **per tensor** ``[1]``: compressed-tensors ``strategy: tensor``; a merged layer (qkv, gate_up) holds one per
  part, so once loaded it is kept per channel (each part's scale repeated over its rows);
- **128x128 blocks** ``[ceil(out/128), ceil(in/128)]``: Hugging Face fine-grained FP8 (``weight_scale_inv``).

Activations are quantized per token (``[tokens, 1]`` scales), per token and 128-column group (the block format,
``[tokens, ceil(in/128)]``) or by one static scale from the checkpoint (``input_scale``). These functions are the
reference the Triton kernels (``kernels/fp8_quant.py``, ``kernels/fp8_block_gemm.py``) are tested against.
``to_fp8`` also quantizes the FP8 KV cache (``layers/attention/kv_quant.py``), in its format.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# the smallest amax a scale is computed from: an all-zero row or block quantizes to zeros, not NaN
AMAX_FLOOR = 1e-12


def to_fp8(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """``values / scale`` (in float32; no scale: the values as they are) saturated to the finite range of ``dtype``
    (e4m3fn, or the KV cache's e5m2) and rounded to nearest-even."""
    limit = torch.finfo(dtype).max
    # by the scale as a tensor: CUDA torch divides by a Python number through its reciprocal (see scale_from_amax)
    scaled = values.float() if scale is None else values.float() / scale.float()
    return scaled.clamp(-limit, limit).to(dtype)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.float().clamp(min=AMAX_FLOOR)
    # over a tensor, not the number: torch divides a CUDA tensor by a Python number as a product with its reciprocal,
    # which can be one ulp off the IEEE quotient (the kernels' scale), and a one-ulp scale moves some fp8 roundings
    return amax / torch.full_like(amax, FP8_MAX)


# ---- weights ----------------------------------------------------------------------------------------------------

def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` -> (fp8 ``[out, in]``, float32 scales ``[out]``): one scale per output row."""
    scale = scale_from_amax(weight.abs().amax(dim=-1))
    return to_fp8(weight, scale[..., None]), scale


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` -> (fp8 ``[out, in]``, float32 scale ``[1]``)."""
    scale = scale_from_amax(weight.abs().amax()).reshape(1)
    return to_fp8(weight, scale), scale


def block_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-rows // block[0]), -(-cols // block[1])


def expand_block_scale(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales ``[..., ceil(rows/b0), ceil(cols/b1)]`` -> one per element ``[..., rows, cols]``."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def quantize_block(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., out, in]`` -> (fp8, float32 ``weight_scale_inv`` ``[..., ceil(out/b0), ceil(in/b1)]``): one scale per
    block, from the block's amax (a partial last block uses the elements it has)."""
    rows, cols = weight.shape[-2:]
    grid_r, grid_c = block_grid(rows, cols, block)
    padded = weight.float().new_zeros(*weight.shape[:-2], grid_r * block[0], grid_c * block[1])
    padded[..., :rows, :cols] = weight.float()
    blocks = padded.unflatten(-1, (grid_c, block[1])).unflatten(-3, (grid_r, block[0]))  # [.., R, b0, C, b1]
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)))
    return to_fp8(weight, expand_block_scale(scale, rows, cols, block)), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 ``[..., out, in]`` times its scales -> ``dtype``. ``block``: 2-D block scales; otherwise ``scale`` is per
    channel (``[..., out]`` or ``[..., out, 1]``) or per tensor (one element), multiplied in float32."""
    values = weight.float()
    rows, cols = weight.shape[-2:]
    if block is not None:
        values = values * expand_block_scale(scale.float(), rows, cols, block)
    elif scale.numel() == 1:
        values = values * scale.float().reshape(())
    else:
        values = values * scale.float().reshape(*weight.shape[:-1], 1)
    return values.to(dtype)


# ---- activations ------------------------------------------------------------------------------------------------

def quantize_tokens(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``[tokens, k]``: per token (``group_size=None``: scales ``[tokens, 1]``)
    or per token and ``group_size`` columns (scales ``[tokens, ceil(k/group_size)]``)."""
    tokens, k = x.shape
    if group_size is None:
        scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True))
        return to_fp8(x, scale), scale
    groups = -(-k // group_size)
    padded = x.float().new_zeros(tokens, groups * group_size)
    padded[:, :k] = x.float()
    scale = scale_from_amax(padded.view(tokens, groups, group_size).abs().amax(dim=-1))
    return to_fp8(x, scale.repeat_interleave(group_size, dim=1)[:, :k]), scale


def quantize_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Activations under one static scale from the checkpoint (``input_scale``)."""
    return to_fp8(x, input_scale.reshape(()))
