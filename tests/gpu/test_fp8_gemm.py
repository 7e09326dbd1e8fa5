"""FP8 kernels against float64 references of the dequantized values.

Activation quantization (``kernels/fp8_quant.py``) must equal the torch reference bit for bit. The GEMMs are held
to relative Frobenius error bounds against float64 ``quant(x) @ dequant(W)^T`` (the same quantization of x as the
kernel's, so what remains is accumulation and output rounding): FP8 products are exact in float32, so a float32
output is within ~1e-6 (3e-4 on the GPU, whose FP8 tensor cores accumulate with fewer bits); a bf16 output rounds each element once (2^-9 relative, ~1.5e-3 in Frobenius norm), fp16
once at 2^-12. The FP8 fused MoE rounds its SwiGLU intermediate to the activation dtype and quantizes it again, where
a one-ulp difference from the reference can move an fp8 rounding (2^-4 relative for that element): bf16 gets 3e-2.

Runs on CUDA; the Triton kernels also under the CPU interpreter (small shapes); ``torch._scaled_mm`` paths on CUDA only.
"""
from __future__ import annotations

import math

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.fp8_block_gemm import BLOCK, BlockGemmConfig, block_gemm  # noqa: E402
from nanovllm.kernels.fp8_quant import quantize_rows  # noqa: E402
from nanovllm.kernels.fused_moe import fused_moe  # noqa: E402
from nanovllm.layers.moe_ops import moe_reference_fp8, select_experts  # noqa: E402
from nanovllm.layers.quantization import fp8_gemm  # noqa: E402
from nanovllm.layers.quantization.fp8_formats import (  # noqa: E402
    dequantize,
    expand_block_scale,
    quantize_block,
    quantize_per_channel,
    quantize_static,
    quantize_tokens,
)

DEVICE = kernel_device()
SMALL = DEVICE is None or DEVICE.type != "cuda"
pytestmark = kernel_test_marks(DEVICE)
CUDA_ONLY = pytest.mark.skipif(SMALL or not fp8_gemm.rowwise_supported(DEVICE),
                               reason="torch._scaled_mm with FP8 scales: CUDA 9.0+")
# float32: exact products, float32 sums; on the GPU the FP8 tensor cores also accumulate each 128-deep block with
# about 14 bits (as DeepSeek-V3's report measures on Hopper) before the kernel adds it in float32
F32_RTOL = 1e-5 if SMALL else 3e-4
RTOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: F32_RTOL}
F8 = torch.float8_e4m3fn



def block_gemm_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float64 ``quant(x) @ dequant(W)^T`` with the kernel's activation quantization (per token and 128 columns)."""
    xq, xs = quantize_tokens(x, BLOCK)
    k = x.shape[1]
    x64 = xq.double() * xs.double().repeat_interleave(BLOCK, dim=1)[:, :k]
    w64 = weight.double() * expand_block_scale(weight_scale.double(), *weight.shape, (BLOCK, BLOCK))
    return x64 @ w64.T

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp8 tensors equal as values (+0 and -0 alike)."""
    return torch.equal(a.float(), b.float())


# ---- activation quantization ---------------------------------------------------------------------------------------

def test_rounding_matches_torch_at_every_fp8_value_and_midpoint() -> None:
    grid = torch.arange(256, dtype=torch.uint8).view(F8).float()
    grid = grid[grid.isfinite()].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2  # ties round to even
    values = torch.cat([grid, midpoints, midpoints.nextafter(grid[1:]), midpoints.nextafter(grid[:-1]),
                        torch.tensor([449.0, 1e6, -1e6, 3e-4, -2e-3])])  # saturation, and under the subnormals
    row = values.to(DEVICE)[None, :]
    q, scale = quantize_rows(row, input_scale=torch.ones(1, device=DEVICE))  # scale 1: each value as itself
    assert same_values(q, row.clamp(-448, 448).to(F8))
    # dynamic: a row whose amax is 448 has scale 1 too
    q, scale = quantize_rows(torch.cat([row, torch.full((1, 1), 448.0, device=DEVICE)], 1).clamp(-448, 448))
    assert scale.item() == 1.0 and same_values(q[:, :-1], row.clamp(-448, 448).to(F8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["token", "group", "static", "group-token-major"])
def test_quantize_rows_is_the_reference(dtype: torch.dtype, mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    m, k = (5, 300) if SMALL else (300, 4096 + 64)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    x[1] = 0
    x = x.to(DEVICE)
    if mode == "static":
        input_scale = torch.tensor([0.05], device=DEVICE)
        q, scale = quantize_rows(x, input_scale=input_scale, pad_to=16)
        assert same_values(q[:m], quantize_static(x, input_scale)) and (scale == 0.05).all()
    else:
        group = None if mode == "token" else 128
        q, scale = quantize_rows(x, group_size=group, pad_to=16, token_major_scales=mode == "group-token-major")
        ref_q, ref_scale = quantize_tokens(x, group)
        assert same_values(q[:m], ref_q) and torch.equal(scale[:m], ref_scale)
        if mode == "group-token-major":
            assert scale.stride(0) == 1
    padding_scale = 0.05 if mode == "static" else 1.0
    assert q.shape[0] % 16 == 0 and (q[m:].float() == 0).all() and (scale[m:] == padding_scale).all()


# ---- GEMMs ------------------------------------------------------------------------------------------------------

def block_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_block(torch.randn(n, k, generator=g) / math.sqrt(k))
    return q.to(DEVICE), scale.to(DEVICE)


SHAPES_SMALL = [(1, 128, 256), (5, 200, 300), (17, 256, 384)]
SHAPES_GPU = [(1, 1024, 2048), (16, 6144, 1024), (256, 2048, 3072), (4096, 4096, 4096), (33, 14336, 4096),
              (7, 4096, 14336)]


@pytest.mark.parametrize("m,n,k", SHAPES_SMALL if SMALL else SHAPES_GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if SMALL else [torch.bfloat16, torch.float16,
                                                                                 torch.float32])
def test_triton_block_gemm(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    q, scale = block_weight(n, k, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEVICE)
    out = block_gemm(x, q, scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, block_gemm_reference(x, q, scale)) < RTOL[dtype]


@pytest.mark.parametrize("cfg", [BlockGemmConfig(block_m=16, block_n=64, split_k=2),
                                 BlockGemmConfig(block_m=16, block_n=32, split_k=4, num_stages=2),
                                 BlockGemmConfig(block_m=64, block_n=128, split_k=1)])
def test_triton_block_gemm_configs(cfg: BlockGemmConfig) -> None:
    m, n, k = (3, 256, 512) if SMALL else (40, 2048, 4096)
    q, scale = block_weight(n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert rel_err(block_gemm(x, q, scale, config=cfg), block_gemm_reference(x, q, scale)) < RTOL[torch.float32]


@CUDA_ONLY
@pytest.mark.parametrize("m,n,k", SHAPES_GPU)
@pytest.mark.parametrize("static", [False, True])
def test_rowwise_scaled_mm(m: int, n: int, k: int, static: bool) -> None:
    g = torch.Generator().manual_seed(m)
    q, scale = quantize_per_channel(torch.randn(n, k, generator=g) / math.sqrt(k))
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    input_scale = (x.float().abs().max() / 448).reshape(1) * 1.5 if static else None
    out = fp8_gemm.rowwise_linear(x, q, scale.view(1, n), input_scale)
    if static:
        xq, xs = quantize_static(x, input_scale), input_scale.double()
    else:
        xq, xs = quantize_tokens(x)
        xs = xs.double()
    ref = (xq.double() * xs) @ dequantize(q, scale, dtype=torch.float64).T
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < RTOL[torch.bfloat16]


@CUDA_ONLY
@pytest.mark.parametrize("m,n,k", SHAPES_GPU)
def test_block_scaled_mm(m: int, n: int, k: int) -> None:
    q, scale = block_weight(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)
    try:
        out = fp8_gemm.block_linear(x, q, scale, backend="scaled_mm")
    except (RuntimeError, NotImplementedError) as exc:  # torch < 2.9, CUDA < 12.9 or not Hopper
        pytest.skip(f"torch._scaled_mm has no block-wise mode here: {exc}")
    assert rel_err(out, block_gemm_reference(x, q, scale)) < RTOL[torch.bfloat16]


# ---- FP8 fused MoE ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,e,k,h,i", [(5, 4, 2, 256, 128), (1, 8, 3, 128, 256)] if SMALL else
                         [(1, 128, 8, 2048, 768), (64, 128, 8, 2048, 768), (2048, 128, 8, 2048, 768),
                          (300, 60, 4, 2048, 1408)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_fp8(m: int, e: int, k: int, h: int, i: int, dtype: torch.dtype) -> None:
    if i % 128:
        pytest.skip("block scales need the intermediate size on 128-blocks")
    g = torch.Generator().manual_seed(m + e)
    hidden = torch.randn(m, h, generator=g).to(dtype)
    q13, s13 = quantize_block(torch.randn(e, 2 * i, h, generator=g) / math.sqrt(h))
    q2, s2 = quantize_block(torch.randn(e, h, i, generator=g) / math.sqrt(i))
    weights, ids = select_experts(torch.randn(m, e, generator=g), k, renormalize=True)
    args = [t.to(DEVICE) for t in (hidden, q13, q2, weights, ids, s13, s2)]
    hidden, q13, q2, weights, ids, s13, s2 = args
    out = fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, poison=True)
    assert out.shape == (m, h) and out.dtype == dtype and torch.isfinite(out).all()
    ref = moe_reference_fp8(hidden, q13, q2, s13, s2, weights, ids)
    assert rel_err(out, ref) < (3e-2 if dtype == torch.bfloat16 else F32_RTOL)
