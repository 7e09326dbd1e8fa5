"""Decode-sized GEMMs (few rows, the weight read once): cuBLAS through torch against Triton kernels.

Qwen3-0.6B's four projections at batch 16, 64 and 256, timed inside a CUDA graph (as decode runs them). Each timed
call runs the GEMM over ``COPIES`` different weights in turn, as the layers of a model do, so the weights come from
memory rather than from L2. The weight-read floor is the weight's bytes over the measured copy bandwidth.

``--split-k`` times the projections with few output columns (o and down, N = 1024), which give cuBLAS too few
tiles to fill the GPU: split-K through cuBLAS's batched GEMM (fp32 partials, ``torch.bmm(out_dtype=...)``), and a
Triton split-K kernel writing fp32 partials or adding into one fp32 output with atomics. The partials' reduction is
timed separately (``sum``), since the engine would fold it into the following add+RMSNorm.

    python benchmarks/bench_small_gemm.py
    python benchmarks/bench_small_gemm.py --split-k
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from nanovllm.benchmarks.roofline import measure_ceilings, time_cuda_graph

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
COPIES = 24  # x 4-12 MiB of weights: well past the 50 MiB L2


@triton.jit
def _split_k_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, ATOMIC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    first = split * k_per_split
    for k in range(first, first + k_per_split, BK):
        x = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + (k + rk)[:, None])
        acc = tl.dot(x, w, acc)
    out = out_ptr + rm[:, None] * N + rn[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=rm[:, None] < M, sem="relaxed")
    else:  # split s writes rows [s * M, (s + 1) * M); one split is a plain GEMM into ``out``'s dtype
        tl.store(out + split * M * N, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] < M)


def triton_linear(x, w, out, bm, bn, bk, warps, stages):
    return triton_split_k(x, w, out, 1, False, bm, bn, bk, warps, stages)


def triton_split_k(x, w, out, splits, atomic, bm, bn, bk, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    if atomic:
        out.zero_()
    _split_k_kernel[(triton.cdiv(m, bm), n // bn, splits)](x, w, out, m, n, k, k // splits, ATOMIC=atomic,
                                                            BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out


def per_weight_us(fn, weights) -> float:
    """Microseconds per GEMM with the weights taken in turn (so from memory, not L2)."""
    return 1e6 * time_cuda_graph(lambda: [fn(w) for w in weights]) / len(weights)


def split_k_main(copy_gbs: float) -> None:
    device = torch.device("cuda")
    for batch, name in itertools.product([16, 64, 128, 256], ["o", "down"]):
        tiles = list(itertools.product([min(64, max(16, triton.next_power_of_2(batch)))], [64, 128], [64, 128], [4],
                                       [3, 4]))
        n, k = SHAPES[name]
        x = torch.randn(batch, k, dtype=torch.bfloat16, device=device)
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) / k**0.5 for _ in range(COPIES)]
        reference = torch.nn.functional.linear(x, weights[0]).float()
        floor = 2 * n * k / copy_gbs / 1e3
        cublas = per_weight_us(lambda w: torch.nn.functional.linear(x, w), weights)
        line = f"batch {batch:3d} {name:5s} floor {floor:4.1f} us  cuBLAS {cublas:5.1f}"
        for splits in (2, 4, 8):
            xs = x.view(batch, splits, k // splits).transpose(0, 1)
            def bmm(w, xs=xs, splits=splits):
                return torch.bmm(xs, w.view(n, splits, k // splits).permute(1, 2, 0), out_dtype=torch.float32)
            torch.testing.assert_close(bmm(weights[0]).sum(0), reference, rtol=2e-2, atol=2e-2)
            line += f"  bmm/{splits} {per_weight_us(bmm, weights):5.1f}"
        partials = torch.empty(8, batch, n, dtype=torch.float32, device=device)
        line += f"  (sum of 4 partials {1e6 * time_cuda_graph(lambda: partials[:4].sum(0)):4.1f})"
        print(line)
        for atomic in (False, True):
            best = None
            for splits, (bm, bn, bk, warps, stages) in itertools.product((2, 4, 8), tiles):
                if (k // splits) % bk:
                    continue
                out = partials[0] if atomic else partials[:splits]
                def run(w, out=out, cfg=(splits, atomic, bm, bn, bk, warps, stages)):
                    return triton_split_k(x, w, out, *cfg)
                try:
                    us = per_weight_us(run, weights)
                except Exception:  # out of shared memory or registers for this tile
                    continue
                if best is None or us < best[0]:
                    best = (us, splits, bm, bn, bk, warps, stages)
            us, splits, *tile = best
            out = partials[0] if atomic else partials[:splits]
            got = triton_split_k(x, weights[0], out, splits, atomic, *tile)
            torch.testing.assert_close(got if atomic else got.sum(0), reference, rtol=2e-2, atol=2e-2)
            print(f"    triton split-K {'atomic' if atomic else 'partials'}: {us:5.1f} us "
                  f"(splits {splits}, BM/BN/BK {tile[0]}/{tile[1]}/{tile[2]}, stages {tile[4]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split-k", action="store_true", help="split-K variants of the N = 1024 projections")
    args = parser.parse_args()
    device = torch.device("cuda")
    copy_gbs = measure_ceilings().copy_bandwidth / 1e9
    print(f"{torch.cuda.get_device_name()}, copy {copy_gbs:,.0f} GB/s")
    if args.split_k:
        split_k_main(copy_gbs)
        return
    configs = list(itertools.product([16, 64], [32, 64, 128], [64, 128, 256], [4], [3, 5]))
    for batch, (name, (n, k)) in itertools.product([16, 64, 256], SHAPES.items()):
        x = torch.randn(batch, k, dtype=torch.bfloat16, device=device)
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) / k**0.5 for _ in range(COPIES)]
        w = weights[0]
        out = torch.empty(batch, n, dtype=torch.bfloat16, device=device)
        floor = 2 * n * k / copy_gbs / 1e3
        cublas = per_weight_us(lambda w: torch.nn.functional.linear(x, w), weights)
        best = None
        for bm, bn, bk, warps, stages in configs:
            if bm > max(16, triton.next_power_of_2(batch)):
                continue
            try:
                us = per_weight_us(lambda w: triton_linear(x, w, out, bm, bn, bk, warps, stages), weights)
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
