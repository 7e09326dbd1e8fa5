"""Dynamic (and static) FP8 quantization of activations on the device, one program per row, no host sync.

``quantize_rows(x)`` -> (float8_e4m3fn ``[Mp, K]``, float32 scales): per token (``[Mp, 1]``), per token and
128-column group (``[Mp, ceil(K/128)]``, optionally laid out token-major in memory as ``torch._scaled_mm``'s
block-wise mode wants), or under one static scale. ``Mp`` is ``M`` padded to a multiple of ``pad_to`` (rows
``torch._scaled_mm`` needs); padding rows are zeros with scale 1. Scales are ``max(amax, 1e-12) / 448`` and values
``x / scale`` saturated to +-448, with IEEE division, so the result equals the torch reference
(``layers/quantization/fp8_formats.py``) bit for bit.

Triton's CPU interpreter rounds float32 -> fp8 wrongly (a mantissa carry is lost), so under it ``fp8_round`` snaps
values to the fp8 grid with integer and float32 arithmetic first, after which the cast is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels import INTERPRET

# constexpr: a compiled kernel may read only constexpr globals (the interpreter reads any)
FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-12)


@triton.jit
def fp8_round(v, EMULATE: tl.constexpr):
    """float32 ``v`` within +-448 -> float8e4nv, rounded to nearest-even."""
    if EMULATE:
        bits = v.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # the binade (subnormals share the lowest one's quantum)
        up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): the grid step is 2^(e - 3)
        down = ((e + 124) << 23).to(tl.float32, bitcast=True)
        steps = tl.abs(v) * up
        steps = (steps + 8388608.0) - 8388608.0  # round half to even in float32
        v = tl.where(v < 0, -steps, steps) * down
    return v.to(tl.float8e4nv)


@triton.jit
def scale_of(amax):
    return tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), FP8_MAX)


@triton.jit
def quantize_tile(x, scale, EMULATE: tl.constexpr):
    """float32 ``x`` over its (broadcast) ``scale`` -> float8e4nv."""
    v = tl.math.div_rn(x, scale)
    return fp8_round(tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX), EMULATE)


@triton.jit
def fp8_tile_dot(xq, w, EMULATE: tl.constexpr, PRECISE: tl.constexpr):
    """``xq @ w`` of two FP8 tiles, in float32.

    Hopper's FP8 ``wgmma`` (tiles of 64 rows and more) keeps fewer bits than float32 while it sums, and Triton lets
    it sum a whole tile: on an H100 the fused MoE's float32 output differed from its float64 reference by 2.8e-3
    (relative norm) at 64-row tiles against 3.8e-5 at 16 and 32. PRECISE (a float32 model) allows no imprecise
    sums; for sm_90 Triton then emits ``mma.sync`` on f16 operands (every FP8 value is exact in f16) with float32
    sums instead of ``wgmma``: slower, as float32 is anyway. bf16 models keep the fast sums, whose error is far
    below bf16's own rounding."""
    if EMULATE:  # the interpreter's dot: float32 operands (fp8 products are exact in float32)
        return tl.dot(xq.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif PRECISE:
        return tl.dot(xq, w, max_num_imprecise_acc=0)
    else:
        return tl.dot(xq, w)


@triton.jit(do_not_specialize=["num_rows"])
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, num_rows, stride_xm, stride_qm, stride_sm, stride_sg,
                       K: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, STATIC: tl.constexpr,
                       EMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    real = row < num_rows
    if GROUP > 0:  # one scale per GROUP columns (GROUP == BLOCK)
        for g in range(0, tl.cdiv(K, GROUP)):
            cols = g * GROUP + offs
            mask = cols < K
            x = tl.load(x_row + cols, mask=mask & real, other=0.0).to(tl.float32)
            scale = tl.where(real, scale_of(tl.max(tl.abs(x), 0)), 1.0)
            tl.store(q_row + cols, quantize_tile(x, scale, EMULATE), mask=mask)
            tl.store(s_ptr + row * stride_sm + g * stride_sg, scale)
    else:  # one scale per row: its amax first, then the values
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK], tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_row + k0 + offs, mask=(k0 + offs < K) & real, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.where(real, scale_of(tl.max(amax, 0)), 1.0)
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=mask & real, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + offs, quantize_tile(x, scale, EMULATE), mask=mask)
        tl.store(s_ptr + row * stride_sm, scale)


def quantize_rows(x: torch.Tensor, group_size: int | None = None, input_scale: torch.Tensor | None = None,
                  pad_to: int = 1, token_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (fp8 ``[Mp, K]``, float32 scales ``[Mp, 1]`` or ``[Mp, ceil(K/group_size)]``).

    ``group_size``: 128 for per-token-group scales (None: per token). ``input_scale``: a static scale (one element)
    instead of dynamic ones; the returned scales are then that value per row. ``token_major_scales``: group scales
    stored with the token index fastest (a transposed view), as ``torch._scaled_mm`` takes block-wise scales.
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows takes a row-major [M, K] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if group_size is not None and (input_scale is not None or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be a power of two and without input_scale, got {group_size}")
    m, k = x.shape
    mp = -(-m // pad_to) * pad_to
    q = torch.empty(mp, k, dtype=torch.float8_e4m3fn, device=x.device)
    groups = 1 if group_size is None else -(-k // group_size)
    if token_major_scales:
        scales = torch.empty(groups, mp, dtype=torch.float32, device=x.device).t()
    else:
        scales = torch.empty(mp, groups, dtype=torch.float32, device=x.device)
    if mp == 0:
        return q, scales
    block = group_size or min(triton.next_power_of_2(k), 2048)
    static = input_scale if input_scale is not None else scales  # a placeholder pointer when dynamic
    _quant_rows_kernel[(mp,)](
        x, q, scales, static, m, x.stride(0), q.stride(0), scales.stride(0), scales.stride(1),
        K=k, GROUP=group_size or 0, BLOCK=block, STATIC=input_scale is not None, EMULATE=INTERPRET,
        num_warps=4 if block <= 1024 else 8,
    )
    return q, scales
