"""Microbenchmark of the MoE expert computation at Qwen3-30B-A3B shapes.

Times ``fused_moe`` (Triton), ``moe_reference`` (torch loop over experts) and, when
``torch._grouped_mm`` runs here, a sort + grouped-GEMM torch path, over decode and prefill token
counts; prints ms (median of ``triton.testing.do_bench``), speed-ups, achieved TFLOP/s and GB/s and
the ratio to a roofline floor. ``fused`` is timed eagerly (small M then pays Python launch costs)
and, as ``graph``, replayed from a CUDA graph as the engine runs decode; the rates and ratios use
``graph`` (grouped_mm is graph-timed too; the reference has host syncs, so it is timed eagerly).
``--sweep`` also tries a grid of tile configs per size (tuning aid).

    python benchmarks/bench_moe.py                 # GPU, E=128 top-8 H=2048 I=768 bf16
    python benchmarks/bench_moe.py --sweep         # + best tile config per M
    python benchmarks/bench_moe.py --smoke         # tiny sizes on CPU under TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Callable

# (peak dense bf16 TFLOP/s, HBM GB/s) by device-name substring, for the roofline floor
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    p.add_argument("--sweep", action="store_true", help="also search tile configs for fused_moe")
    p.add_argument("--sweep-block-m", type=int, nargs="*", default=None,
                   help="BLOCK_M values to sweep (default: 16 for decode sizes, else 16 32 64)")
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 64, 256, 1024, 4096, 8192])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    return p.parse_args()


def timer(device) -> Callable[[Callable[[], object]], float]:
    """Median ms of fn: CUDA events via do_bench on GPU, wall clock on CPU (smoke only)."""
    import triton

    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def make_grouped_mm(hidden, w13, w2, weights, ids):
    """Sort pairs by expert (device only), two ``torch._grouped_mm`` calls, unsort and sum.
    Returns None when grouped_mm is missing or rejects these inputs on this device."""
    import torch
    import torch.nn.functional as F

    if not hasattr(torch, "_grouped_mm") or hidden.device.type != "cuda":
        return None
    m, k = ids.shape
    e, two_i, h = w13.shape
    w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H], column-major

    def run():
        flat = ids.flatten().long()
        order = torch.sort(flat, stable=True).indices
        counts = torch.zeros(e, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        x = hidden[order // k]
        gate, up = torch._grouped_mm(x, w13_t, offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, w2_t, offs=offs)
        y = y * weights.flatten()[order, None].to(y.dtype)
        out = torch.empty_like(y)
        out[order] = y
        return out.view(m, k, h).sum(1)

    try:
        run()
        torch.cuda.synchronize()
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return run


def sweep_configs(block_ms: list[int]):
    from nanovllm.kernels.fused_moe import MoEConfig

    for bm, bn, bk, warps, stages in itertools.product(block_ms, (32, 64, 128), (64, 128),
                                                       (4, 8), (3, 4)):
        if bm * bn >= 64 * 128 and warps == 4 or bm * bn <= 16 * 64 and warps == 8:
            continue
        yield MoEConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


def main() -> None:
    args = parse_args()
    if args.smoke:
        # must be set before Triton and the kernels are imported
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens, args.experts, args.top_k, args.hidden, args.inter = [1, 16], 8, 2, 64, 32

    import torch
    import triton

    from nanovllm.kernels.fused_moe import fused_moe, pick_config
    from nanovllm.layers.moe_ops import moe_reference, select_experts

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU interpreter check")
    dtype = torch.bfloat16
    e, k, h, i = args.experts, args.top_k, args.hidden, args.inter
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    peak_tflops, peak_gbps = next((v for key, v in PEAKS.items() if key in name), (None, None))
    bench = timer(device)
    # the engine replays decode from CUDA graphs, so time fused_moe that way (no launch gaps)
    graph_bench = bench if device.type != "cuda" else (
        lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))

    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5).to(device, dtype)
    w2 = (torch.randn(e, h, i, generator=gen) / i ** 0.5).to(device, dtype)
    print(f"device: {name}; E={e} top_k={k} hidden={h} moe_inter={i} {dtype}; median ms")
    cols = ("M", "fused", "graph", "ref", "grouped_mm", "x ref", "x gmm", "TFLOP/s", "GB/s", "floor", "x floor",
            "rel err", "config")
    print("  ".join(f"{c:>10}" for c in cols))
    for m in args.tokens:
        hidden = torch.randn(m, h, generator=gen).to(device, dtype)
        weights, ids = select_experts(torch.randn(m, e, generator=gen).to(device), k, renormalize=True)
        ref_out = moe_reference(hidden.float(), w13.float(), w2.float(), weights, ids) \
            if m * e * h <= 4096 * 128 * 2048 else None
        out = fused_moe(hidden, w13, w2, weights, ids)
        err = f"{((out.float() - ref_out).norm() / ref_out.norm()).item():.1e}" if ref_out is not None else "-"
        del ref_out

        def run_fused(c):
            return lambda: fused_moe(hidden, w13, w2, weights, ids, config=c)

        cfg = pick_config(m, e, k)
        t_fused = graph_bench(run_fused(cfg))
        if args.sweep and device.type == "cuda":
            block_ms = args.sweep_block_m or ([16, 32, 64] if m * k / e > 4 else [16])
            for c in sweep_configs(block_ms):
                try:
                    t = graph_bench(run_fused(c))
                except Exception:  # noqa: BLE001 - e.g. out of shared memory: skip the config
                    continue
                if t < t_fused:
                    t_fused, cfg = t, c
        t_eager = bench(run_fused(cfg))
        t_ref = bench(lambda: moe_reference(hidden, w13, w2, weights, ids))
        gmm = make_grouped_mm(hidden, w13, w2, weights, ids)
        t_gmm = float("nan")
        if gmm is not None:
            try:  # also free of host syncs, so time it the same way as fused
                t_gmm = graph_bench(gmm)
            except RuntimeError:
                t_gmm = bench(gmm)

        flops = 6.0 * m * k * h * i  # two GEMMs: 2*(2I)*H + 2*H*I per (token, expert) pair
        experts_hit = torch.unique(ids).numel()
        nbytes = experts_hit * 3 * h * i * 2 + 2 * m * h * 2  # weights of the experts used + in/out
        floor = max(flops / (peak_tflops * 1e9), nbytes / (peak_gbps * 1e6)) if peak_tflops else float("nan")
        row = (m, f"{t_eager:.3f}", f"{t_fused:.3f}", f"{t_ref:.3f}", f"{t_gmm:.3f}", f"{t_ref / t_fused:.1f}",
               f"{t_gmm / t_fused:.2f}", f"{flops / t_fused / 1e9:.1f}", f"{nbytes / t_fused / 1e6:.0f}",
               f"{floor:.3f}", f"{t_fused / floor:.1f}", err,
               f"{cfg.block_m}/{cfg.block_n}/{cfg.block_k}/w{cfg.num_warps}/s{cfg.num_stages}")
        print("  ".join(f"{str(v):>10}" for v in row))


if __name__ == "__main__":
    main()
