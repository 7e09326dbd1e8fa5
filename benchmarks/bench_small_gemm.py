"""Decode-sized GEMMs (few rows, the weight read once): cuBLAS through torch against a plain Triton kernel.

Qwen3-0.6B's four projections at batch 16, 64 and 256, each timed inside a CUDA graph (as decode runs them). The
weight-read floor is the weight's bytes over the measured copy bandwidth.

    python benchmarks/bench_small_gemm.py
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from nanovllm.benchmarks.roofline import measure_ceilings, time_cuda_graph

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


@triton.jit
def _linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        x = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + (k + rk)[:, None])
        acc = tl.dot(x, w, acc)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] < M)


def triton_linear(x, w, out, bm, bn, bk, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    _linear_kernel[(triton.cdiv(m, bm), n // bn)](x, w, out, m, n, k, BM=bm, BN=bn, BK=bk,
                                                   num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    device = torch.device("cuda")
    copy_gbs = measure_ceilings().copy_bandwidth / 1e9
    print(f"{torch.cuda.get_device_name()}, copy {copy_gbs:,.0f} GB/s")
    configs = list(itertools.product([16, 64], [32, 64, 128], [64, 128, 256], [4], [3, 5]))
    for batch, (name, (n, k)) in itertools.product([16, 64, 256], SHAPES.items()):
        x = torch.randn(batch, k, dtype=torch.bfloat16, device=device)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device) / k**0.5
        out = torch.empty(batch, n, dtype=torch.bfloat16, device=device)
        floor = 2 * n * k / copy_gbs / 1e3
        cublas = 1e6 * time_cuda_graph(lambda: torch.nn.functional.linear(x, w))
        best = None
        for bm, bn, bk, warps, stages in configs:
            if bm > max(16, triton.next_power_of_2(batch)):
                continue
            try:
                us = 1e6 * time_cuda_graph(lambda: triton_linear(x, w, out, bm, bn, bk, warps, stages))
            except Exception:  # out of shared memory or registers for this tile
                continue
            if best is None or us < best[0]:
                best = (us, bm, bn, bk, warps, stages)
        torch.testing.assert_close(triton_linear(x, w, out, *best[1:]), torch.nn.functional.linear(x, w),
                                   rtol=2e-2, atol=2e-2)
        print(f"batch {batch:3d} {name:8s} floor {floor:5.1f} us  cuBLAS {cublas:5.1f} us  "
              f"triton {best[0]:5.1f} us (BM {best[1]} BN {best[2]} BK {best[3]} warps {best[4]} stages {best[5]})")


if __name__ == "__main__":
    main()
