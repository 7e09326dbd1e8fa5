"""FP8 GEMMs against bf16, per projection shape: which FP8 path to run where.

For the linear projections of Qwen3-0.6B and Llama-3.1-8B at M = 1, 16, 256 and 4096 tokens, times (in a CUDA graph,
so launch costs are excluded, as in decode) ``F.linear`` in bf16, and each FP8 path as the layers run it, activation
quantization included:

- ``rowwise``: per-channel weight scales, per-token activations, ``torch._scaled_mm`` (compressed-tensors FP8 and
  ``quantization="fp8"``);
- ``block-triton``: 128x128 block scales, the Triton block GEMM with fused activation quantization (fine-grained FP8);
- ``block-scaled_mm``: the same numbers through ``torch._scaled_mm``'s block-wise mode, where this torch has it.

Each timed call cycles through enough copies of the weight to read it from memory rather than L2. The weight-read
floor is the weight's bytes over the measured copy bandwidth. Prints one line per shape and M; ``--output-json``
keeps the numbers.

    python -m nanovllm.benchmarks.fp8_gemm [--models qwen3-0.6b llama-3.1-8b] [--m 1 16 256 4096]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# projection -> (N, K): qkv and gate_up merged, as the engine runs them
SHAPES = {
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
    "llama-3.1-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
L2_FLUSH_BYTES = 256 << 20  # each timed call reads at least this much weight


def _per_call_us(fn: Callable[[int], object], copies: int) -> float:
    from nanovllm.benchmarks.roofline import time_cuda_graph

    return 1e6 * time_cuda_graph(lambda: [fn(i) for i in range(copies)]) / copies


def bench_shape(n: int, k: int, m: int, copy_gbs: float) -> dict[str, float | None]:
    from nanovllm.layers.quantization import fp8_gemm
    from nanovllm.layers.quantization.fp8_formats import quantize_block, quantize_per_channel

    device = torch.device("cuda")
    copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k)))  # the FP8 weights alone flush L2
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    master = torch.randn(n, k, device=device) / k**0.5
    bf16 = [master.to(torch.bfloat16) for _ in range(copies)]
    channel = [quantize_per_channel(master) for _ in range(copies)]
    channel = [(q, s.view(1, n)) for q, s in channel]
    block = [quantize_block(master) for _ in range(copies)]
    result: dict[str, float | None] = {
        "floor_bf16_us": 2 * n * k / copy_gbs / 1e3, "floor_fp8_us": n * k / copy_gbs / 1e3,
        "bf16_us": _per_call_us(lambda i: F.linear(x, bf16[i]), copies),
        "rowwise_us": _per_call_us(lambda i: fp8_gemm.rowwise_linear(x, *channel[i]), copies),
        "block_triton_us": _per_call_us(lambda i: fp8_gemm.block_linear(x, *block[i], backend="triton"), copies),
    }
    try:
        prepared = [fp8_gemm.block_scale_for_scaled_mm(s) for _, s in block]
        fp8_gemm.block_linear(x, *block[0], backend="scaled_mm", scaled_mm_scale=prepared[0])
        result["block_scaled_mm_us"] = _per_call_us(
            lambda i: fp8_gemm.block_linear(x, *block[i], backend="scaled_mm", scaled_mm_scale=prepared[i]), copies)
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("no block-wise torch._scaled_mm here: %s", str(exc).splitlines()[0])
        result["block_scaled_mm_us"] = None
    from nanovllm.kernels.fp8_quant import quantize_rows

    result["act_quant_us"] = _per_call_us(lambda i: quantize_rows(x, pad_to=16), 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 16, 256, 4096])
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("the FP8 GEMM benchmark needs a CUDA GPU")
    from nanovllm.benchmarks.roofline import measure_ceilings
    from nanovllm.layers.quantization import fp8_gemm

    device = torch.device("cuda")
    if not fp8_gemm.fp8_supported(device):
        raise SystemExit(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability 8.9+)")
    copy_gbs = measure_ceilings().copy_bandwidth / 1e9
    logger.info("device %s, torch %s, copy bandwidth %.0f GB/s; microseconds per GEMM (in a CUDA graph), "
                "x = speedup over bf16", torch.cuda.get_device_name(device), torch.__version__, copy_gbs)
    logger.info("%-13s %-8s %5s %6s | %8s %8s | %15s %15s %15s | %s", "model", "proj", "M", "N x K", "floor16",
                "floor8", "bf16", "rowwise", "block-triton", "block-scaled_mm / act-quant")
    rows = []
    for model in args.models:
        for proj, (n, k) in SHAPES[model].items():
            for m in args.m:
                r = bench_shape(n, k, m, copy_gbs)
                torch.cuda.empty_cache()
                rows.append({"model": model, "proj": proj, "m": m, "n": n, "k": k, **r})

                def cell(key: str) -> str:
                    value = r[key]
                    return "n/a" if value is None else f"{value:7.1f} ({r['bf16_us'] / value:4.2f}x)"

                logger.info("%-13s %-8s %5d %dx%d | %8.1f %8.1f | %15s %15s %15s | %s / %.1f", model, proj, m, n, k,
                            r["floor_bf16_us"], r["floor_fp8_us"], f"{r['bf16_us']:7.1f}", cell("rowwise_us"),
                            cell("block_triton_us"), cell("block_scaled_mm_us"), r["act_quant_us"])
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "copy_gbs": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
