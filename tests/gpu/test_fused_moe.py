"""Triton fused MoE against the torch reference (``moe_reference``) and the alignment invariants.

Runs on CUDA when present; otherwise on CPU tensors under Triton's interpreter when TRITON_INTERPRET=1
(a few small shapes only); otherwise skips. The reference runs in float32 on the same low-precision
inputs, and the kernel's work buffers start as NaN, so a row it never writes shows up.
"""
from __future__ import annotations

import math

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.fused_moe import MoEConfig, fused_moe, moe_align  # noqa: E402
from nanovllm.layers.moe_ops import moe_reference, select_experts  # noqa: E402

DEVICE = kernel_device()
SMALL = DEVICE is None or DEVICE.type != "cuda"  # the interpreter is slow: smaller cases
pytestmark = kernel_test_marks(DEVICE)

# The kernel rounds the SwiGLU activation and each weighted expert output to the input dtype (~2^-9
# relative for bf16, 2^-12 for fp16) before the final sum; float32 uses full-precision dots.
# (Triton's CPU interpreter truncates fp32->bf16 instead of rounding, which roughly doubles the
# bf16 error there; still inside the bound.)
RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
GPU_ONLY = pytest.mark.skipif(SMALL, reason="large case: CUDA only")


def make_inputs(m: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / math.sqrt(h)).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / math.sqrt(i)).to(dtype)
    weights, ids = select_experts(torch.randn(m, e, generator=g), k, renormalize=True)
    return [t.to(DEVICE) for t in (hidden, w13, w2, weights, ids)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def check(m: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, config: MoEConfig | None = None):
    hidden, w13, w2, weights, ids = make_inputs(m, e, k, h, i, dtype, seed=m + 7 * e + 31 * k)
    out = fused_moe(hidden, w13, w2, weights, ids, config=config, poison=True)
    assert out.shape == (m, h) and out.dtype == dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) rows reached the output"
    ref = moe_reference(hidden.float(), w13.float(), w2.float(), weights, ids)
    err = rel_err(out, ref)
    assert err < RTOL[dtype], f"rel err {err:.2e}"


# -- alignment -----------------------------------------------------------------------------------


@pytest.mark.parametrize("m,e,k,block_m", [(1, 8, 2, 16), (7, 8, 8, 16), (33, 60, 4, 32), (40, 4, 2, 16)]
                         + ([] if SMALL else [(512, 128, 8, 64), (4096, 60, 4, 32)]))
def test_align_invariants(m, e, k, block_m):
    g = torch.Generator().manual_seed(m + e)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]).int()
    if m >= 40:
        ids[: m // 2] = ids[0]  # a crowd on a few experts, so some experts are idle
    align = moe_align(ids.to(DEVICE), e, block_m)
    n = m * k
    seg_end = align.seg_end.cpu().long()
    sorted_ids = align.sorted_ids.cpu().long()
    assert sorted_ids.numel() >= seg_end[-1] and sorted_ids.numel() % block_m == 0
    counts = torch.bincount(ids.flatten().long(), minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    assert torch.equal(seg_end, padded.cumsum(0))
    flat = ids.flatten().long()
    start = 0
    for expert in range(e):
        seg = sorted_ids[start:seg_end[expert]]
        real, pad = seg[: counts[expert]], seg[counts[expert]:]
        # the expert's pairs in increasing pair order (deterministic), then the sentinel
        assert torch.equal(real, (flat == expert).nonzero().flatten())
        assert (pad == n).all()
        start = seg_end[expert]


# -- fused_moe vs reference ----------------------------------------------------------------------

SMALL_CASES = [  # (m, e, k, h, i): interpreter-sized
    (1, 8, 1, 64, 32), (1, 8, 8, 64, 32), (7, 8, 2, 64, 32), (7, 8, 4, 80, 48), (7, 4, 4, 64, 32),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,e,k,h,i", SMALL_CASES)
def test_small(m, e, k, h, i, dtype):
    check(m, e, k, h, i, dtype)


@GPU_ONLY
@pytest.mark.parametrize("m", [1, 7, 64, 512, 4096])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("e", [8, 60, 128])
def test_sweep_bf16(m, e, k):
    check(m, e, k, 256, 128, torch.bfloat16)


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,e,k", [(1, 60, 4), (64, 128, 8), (512, 8, 2), (4096, 60, 4)])
def test_sweep_other_dtypes(m, e, k, dtype):
    check(m, e, k, 256, 128, dtype)


@GPU_ONLY
@pytest.mark.parametrize("m", [1, 64, 512, 4096])
def test_qwen3_30b_a3b_shapes(m):
    check(m, 128, 8, 2048, 768, torch.bfloat16)


@GPU_ONLY
@pytest.mark.parametrize("m", [7, 512])
def test_ragged_dims(m):
    # hidden not a multiple of BLOCK_K (masked K loop), intermediate not a multiple of BLOCK_N
    check(m, 60, 4, 200, 96, torch.bfloat16)


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_every_block_m(block_m):
    config = MoEConfig(block_m=block_m, block_n=32, block_k=32, num_warps=4, num_stages=2)
    m = 7 if SMALL else 300
    check(m, 8, 2, 64, 32, torch.bfloat16 if SMALL else torch.float16, config)


def test_idle_experts_and_crowded_expert():
    hidden, w13, w2, weights, _ = make_inputs(40 if SMALL else 1000, 16, 2, 64, 32, torch.float16)
    ids = torch.zeros_like(weights, dtype=torch.int32)
    ids[:, 1] = 5  # experts 0 and 5 take everything
    out = fused_moe(hidden, w13, w2, weights, ids, poison=True)
    ref = moe_reference(hidden.float(), w13.float(), w2.float(), weights, ids)
    assert rel_err(out, ref) < RTOL[torch.float16]


def test_deterministic_and_empty():
    hidden, w13, w2, weights, ids = make_inputs(7 if SMALL else 777, 8, 2, 64, 32, torch.bfloat16)
    a = fused_moe(hidden, w13, w2, weights, ids)
    b = fused_moe(hidden, w13, w2, weights, ids)
    assert torch.equal(a, b)
    out = fused_moe(hidden[:0], w13, w2, weights[:0], ids[:0])
    assert out.shape == (0, 64)


@pytest.mark.skipif(DEVICE is None or DEVICE.type != "cuda", reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("m", [1, 64, 1024])
def test_cuda_graph_replay(m):
    e, k = 128, 8
    hidden, w13, w2, weights, ids = make_inputs(m, e, k, 512, 256, torch.bfloat16, seed=1)
    static = [hidden.clone(), weights.clone(), ids.clone()]
    eager = fused_moe(hidden, w13, w2, weights, ids)  # also compiles the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(static[0], w13, w2, static[1], static[2])
    graph.replay()
    assert torch.equal(static_out, eager)
    # new routing in the same buffers: the replay must follow the data, not the captured layout
    hidden2, _, _, weights2, ids2 = make_inputs(m, e, k, 512, 256, torch.bfloat16, seed=2)
    for dst, src in zip(static, (hidden2, weights2, ids2)):
        dst.copy_(src)
    graph.replay()
    assert torch.equal(static_out, fused_moe(hidden2, w13, w2, weights2, ids2))
