"""The fused MoE's FP8 error against its float64 reference, per tile height (float32 activations, one CUDA GPU).

Qwen3-30B-A3B's expert shape (128 experts, top-8, hidden 2048, intermediate 768) at m = 64 and 2048 tokens. On an
H100 the error followed the tile height (64 rows and up use Hopper's FP8 wgmma): docs/benchmarks.md.

    python scripts/moe_fp8_tile_error.py
"""
from __future__ import annotations

import math

import torch

from nanovllm.kernels.fused_moe import MoEConfig, fused_moe
from nanovllm.layers.moe_ops import moe_reference_fp8, select_experts
from nanovllm.layers.quantization.fp8_formats import quantize_block

EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768


def main() -> None:
    for m in (64, 2048):
        g = torch.Generator().manual_seed(m + EXPERTS)
        hidden = torch.randn(m, HIDDEN, generator=g)
        q13, s13 = quantize_block(torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / math.sqrt(HIDDEN))
        q2, s2 = quantize_block(torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / math.sqrt(INTER))
        weights, ids = select_experts(torch.randn(m, EXPERTS, generator=g), TOP_K, renormalize=True)
        hidden, q13, q2, weights, ids, s13, s2 = [t.cuda() for t in (hidden, q13, q2, weights, ids, s13, s2)]
        ref = moe_reference_fp8(hidden, q13, q2, s13, s2, weights, ids)
        for block_m, num_warps in ((16, 4), (32, 4), (64, 4), (128, 8)):
            cfg = MoEConfig(block_m=block_m, block_n=64, block_k=128, num_warps=num_warps, num_stages=2)
            out = fused_moe(hidden, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, config=cfg)
            error = ((out.double() - ref).norm() / ref.norm()).item()
            print(f"m={m} block_m={block_m}: relative error {error:.2e}")


if __name__ == "__main__":
    main()
