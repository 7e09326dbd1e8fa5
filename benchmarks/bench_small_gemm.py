"""Decode-sized GEMMs (few rows, the weight read once): cuBLAS through torch against Triton kernels.

Qwen3-0.6B's four projections at batch 16, 64 and 256, timed inside a CUDA graph (as decode runs them). Each timed
call runs the GEMM over ``COPIES`` different weights in turn, as the layers of a model do, so the weights come from
memory rather than from L2. The weight-read floor is the weight's bytes over the measured copy bandwidth.

``--split-k`` times what the engine runs for the projections with few output columns (o and down, N = 1024),
which give cuBLAS too few tiles to fill the GPU: cuBLAS followed by the compiled add + RMSNorm, against the split-K
kernel followed by the add + RMSNorm that sums its partials (``kernels/split_k.py``), at the engine's plan; with
``--variants`` also the split-K GEMM alone at variants of that plan, to check the plan's choices (minutes).
``--model qwen3-8b`` takes that model's shapes instead.

    python benchmarks/bench_small_gemm.py
    python benchmarks/bench_small_gemm.py --split-k [--variants] [--model qwen3-8b]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import triton

from nanovllm.benchmarks.roofline import measure_ceilings, time_cuda_graph
from nanovllm.kernels.split_k import SplitKPlan, partials_add_rms_norm, plan_for, split_k_matmul
from nanovllm.layers.fusion import add_rms_norm

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
COPIES = 24  # x 4-12 MiB of weights: well past the 50 MiB L2


def triton_linear(x, w, bm, bn, bk, warps, stages):
    """A plain Triton GEMM: the split-K kernel with one split, written in the activations' dtype."""
    return split_k_matmul(x, w, SplitKPlan(1, bm, bn, bk, warps, stages), out_dtype=x.dtype)[0]


def per_weight_us(fn, weights) -> float:
    """Microseconds per GEMM with the weights taken in turn (so from memory, not L2)."""
    return 1e6 * time_cuda_graph(lambda: [fn(w) for w in weights]) / len(weights)


def split_k_main(copy_gbs: float, shapes: dict[str, tuple[int, int]], variants: bool) -> None:
    device = torch.device("cuda")
    fused_norm = torch.compile(add_rms_norm, dynamic=True)  # the engine's add + RMSNorm
    for name, batch in itertools.product(["o", "down"], [1, 8, 16, 32, 64, 96, 128, 192, 256]):
        n, k = shapes[name]
        x = torch.randn(batch, k, dtype=torch.bfloat16, device=device)
        residual = torch.randn(batch, n, dtype=torch.bfloat16, device=device)
        norm_weight = torch.ones(n, dtype=torch.bfloat16, device=device)
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) / k**0.5 for _ in range(COPIES)]
        floor = 2 * n * k / copy_gbs / 1e3
        cublas = per_weight_us(lambda w: fused_norm(torch.nn.functional.linear(x, w), residual, norm_weight, 1e-6),
                               weights)
        plan = plan_for(x, weights[0])
        line = f"{name:5s} batch {batch:3d}  floor {floor:4.1f} us  cuBLAS + norm {cublas:5.1f}"
        if plan is None:
            print(line + "  (no split planned)")
            continue
        split = per_weight_us(lambda w: partials_add_rms_norm(split_k_matmul(x, w, plan), residual, norm_weight,
                                                              1e-6), weights)
        expected = torch.nn.functional.linear(x, weights[0]).float()
        torch.testing.assert_close(split_k_matmul(x, weights[0], plan).sum(0), expected, rtol=2e-2, atol=2e-2)
        gemm = per_weight_us(lambda w: split_k_matmul(x, w, plan), weights)
        line += f"  split-K + norm {split:5.1f} ({cublas - split:+4.1f})  GEMM alone {gemm:4.1f} at {plan}"
        print(line)
        if not variants:
            continue
        best = (gemm, plan)
        variants = itertools.product({max(1, plan.splits // 2), plan.splits, plan.splits * 2}, (64, 128),
                                     (64, 128, 256), (3, 4, 5))
        for splits, bn, bk, stages in variants:
            variant = dataclasses.replace(plan, splits=splits, block_n=bn, block_k=bk, num_stages=stages)
            if k % (splits * bk) or n % bn or variant == plan:
                continue
            try:
                us = per_weight_us(lambda w: split_k_matmul(x, w, variant), weights)
            except Exception:  # out of shared memory or registers for this tile
                continue
            best = min(best, (us, variant), key=lambda t: t[0])
        if best[1] != plan:
            print(f"      best variant {best[0]:4.1f} us at {best[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-k", action="store_true", help="split-K for the o and down projections")
    parser.add_argument("--variants", action="store_true", help="with --split-k: time variants of each plan")
    parser.add_argument("--model", choices=["qwen3-0.6b", "qwen3-8b"], default="qwen3-0.6b")
    args = parser.parse_args()
    device = torch.device("cuda")
    copy_gbs = measure_ceilings().copy_bandwidth / 1e9
    print(f"{torch.cuda.get_device_name()}, copy {copy_gbs:,.0f} GB/s")
    shapes = SHAPES_8B if args.model == "qwen3-8b" else SHAPES
    if args.split_k:
        split_k_main(copy_gbs, shapes, args.variants)
        return
    configs = list(itertools.product([16, 64], [32, 64, 128], [64, 128, 256], [4], [3, 5]))
    for batch, (name, (n, k)) in itertools.product([16, 64, 256], shapes.items()):
        x = torch.randn(batch, k, dtype=torch.bfloat16, device=device)
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) / k**0.5 for _ in range(COPIES)]
        w = weights[0]
        floor = 2 * n * k / copy_gbs / 1e3
        cublas = per_weight_us(lambda w: torch.nn.functional.linear(x, w), weights)
        best = None
        for bm, bn, bk, warps, stages in configs:
            if bm > max(16, triton.next_power_of_2(batch)):
                continue
            try:
                us = per_weight_us(lambda w: triton_linear(x, w, bm, bn, bk, warps, stages), weights)
            except Exception:  # out of shared memory or registers for this tile
                continue
            if best is None or us < best[0]:
                best = (us, bm, bn, bk, warps, stages)
        torch.testing.assert_close(triton_linear(x, w, *best[1:]), torch.nn.functional.linear(x, w),
                                   rtol=2e-2, atol=2e-2)
        print(f"batch {batch:3d} {name:8s} floor {floor:5.1f} us  cuBLAS {cublas:5.1f} us  "
              f"triton {best[0]:5.1f} us (BM {best[1]} BN {best[2]} BK {best[3]} warps {best[4]} stages {best[5]})")


if __name__ == "__main__":
    main()
