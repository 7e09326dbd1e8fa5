"""Split-K partial products and the add + RMSNorm that sums them, against float64 and eager torch references.

The kernels run on CUDA when present, else under Triton's CPU interpreter (small shapes only), else skip. The
layer test (a row-parallel projection handing ``PartialSums`` to the norm) needs CUDA, as the fast path does.
"""
from __future__ import annotations

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.split_k import (  # noqa: E402
    MAX_ROWS, SplitKPlan, partials_add_rms_norm, plan_split_k, split_k_matmul,
)
from nanovllm.layers.fusion import add_rms_norm  # noqa: E402

DEVICE = kernel_device()
pytestmark = kernel_test_marks(DEVICE)
ON_GPU = DEVICE is not None and DEVICE.type == "cuda"

# bf16 / fp16 inputs, fp32 accumulation: the partial sums' error is the inputs' (none), and a few 1e-6 of
# summation order; the final rounding to the activation dtype is the unsplit path's too.
def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


SHAPES = [(128, 256, 2, 64, 64)] + ([(1024, 2048, 8, 64, 128), (1024, 3072, 2, 64, 128)] if ON_GPU else [])


def test_plan_fills_the_gpu_with_whole_splits() -> None:
    o_proj = plan_split_k(16, 1024, 2048, sms=132)  # Qwen3-0.6B's o_proj at batch 16: 16 tiles
    assert o_proj is not None and o_proj.splits == 8 and o_proj.block_m == 16
    down = plan_split_k(256, 1024, 3072, sms=132)  # 64 tiles of 64 rows
    assert down is not None and down.splits == 2 and 3072 % (down.splits * down.block_k) == 0
    for rows in range(1, MAX_ROWS + 1, 7):
        plan = plan_split_k(rows, 1024, 3072, sms=132)
        assert plan is not None
        tiles = -(-rows // plan.block_m) * (1024 // plan.block_n)
        assert tiles * plan.splits <= 132 and 3072 % (plan.splits * plan.block_k) == 0
    assert plan_split_k(MAX_ROWS + 1, 1024, 2048, sms=132) is None  # prefill-sized: cuBLAS
    assert plan_split_k(16, 1000, 2048, sms=132) is None  # the tiles do not divide the columns
    assert plan_split_k(256, 8192, 2048, sms=132) is None  # output tiles alone fill the GPU
    # stages as the shared memory allows: 99 KiB (sm_86 / sm_89) holds two of 64 x 128 + 128 x 64 half tiles
    assert plan_split_k(64, 1024, 3072, sms=84, shared_memory=99 * 1024).num_stages == 2
    assert plan_split_k(16, 1024, 3072, sms=84, shared_memory=99 * 1024).num_stages == 4  # 16-row tiles fit 4
    assert plan_split_k(64, 1024, 3072, sms=84, shared_memory=48 * 1024) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}/{s[2]}")
def test_partials_are_the_products_of_k_slices(shape, rows: int, dtype: torch.dtype) -> None:
    out_features, in_features, splits, block_n, block_k = shape
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
    plan = SplitKPlan(splits, min(64, max(16, 1 << (rows - 1).bit_length())), block_n, block_k, num_stages=2)
    partials = split_k_matmul(x.to(DEVICE), weight.to(DEVICE), plan).cpu()
    assert partials.shape == (splits, rows, out_features) and partials.dtype == torch.float32
    width = in_features // splits
    for split in range(splits):
        part = slice(split * width, (split + 1) * width)
        expected = x[:, part].double() @ weight[:, part].double().T
        torch.testing.assert_close(partials[split].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [128, 1024] if ON_GPU else [128])
def test_norm_adds_the_partials_as_the_unsplit_path_rounds(hidden: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(hidden)
    rows, splits = 7, 4
    partials = torch.randn(splits, rows, hidden, generator=generator)
    residual = torch.randn(rows, hidden, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(dtype)
    out, new_residual = partials_add_rms_norm(partials.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), 1e-6)
    # the unsplit path: the projection's output in the activation dtype, then the eager add + RMSNorm
    expected_out, expected_residual = add_rms_norm(partials.sum(0).to(dtype), residual, weight, 1e-6)
    # a unit of the last place (2^-8 relative in bf16, 2^-11 in fp16) at each of the two roundings; the CPU
    # interpreter truncates where a GPU rounds to nearest, hence norm-wise bounds rather than elementwise ones
    bound = 8e-3 if dtype == torch.bfloat16 else 1e-3
    assert relative_error(new_residual.cpu(), expected_residual) < bound
    assert relative_error(out.cpu(), expected_out) < 2 * bound
    # the same bits every run
    again, _ = partials_add_rms_norm(partials.to(DEVICE), residual.to(DEVICE), weight.to(DEVICE), 1e-6)
    assert torch.equal(again, out)
    if ON_GPU:  # the interpreter truncates where a GPU rounds to nearest: exact only there
        total = partials[0].clone()
        for split in range(1, splits):  # in split order, in fp32
            total += partials[split]
        assert torch.equal(new_residual.cpu(), total.to(dtype) + residual)  # rounded as a GEMM output, then added


@pytest.mark.skipif(not ON_GPU, reason="the deferred sum is taken on the CUDA fast path only")
@pytest.mark.parametrize("rows", [1, 16, 100, 256, 300])
def test_projection_then_norm_matches_the_unsplit_path(rows: int) -> None:
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.linear import PartialSums, RowParallelLinear

    torch.manual_seed(rows)
    device = torch.device("cuda")
    with torch.device(device):
        proj = RowParallelLinear(3072, 1024, defer_sum=True).to(torch.bfloat16)
        norm = RMSNorm(1024, fused=True).to(torch.bfloat16)
    proj.weight.data.normal_(std=3072**-0.5)
    norm.weight.data.normal_(1.0, 0.1)
    x = torch.randn(rows, 3072, device=device, dtype=torch.bfloat16)
    residual = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16)
    expected_out, expected_residual = add_rms_norm(
        torch.nn.functional.linear(x, proj.weight), residual, norm.weight, norm.eps
    )
    deferred = proj(x)
    out, new_residual = norm(deferred, residual)
    assert isinstance(deferred, PartialSums) == (rows <= MAX_ROWS)
    # bf16 rounding of the projection may differ by one unit where cuBLAS summed in another order
    torch.testing.assert_close(new_residual, expected_residual, rtol=2 ** -7, atol=2 ** -6)
    torch.testing.assert_close(out, expected_out, rtol=2 ** -6, atol=2 ** -5)
