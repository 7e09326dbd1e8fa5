"""The paged decode kernel on a bf16 and an FP8 KV cache: time per call and the bandwidth it reaches.

One decode step of one layer at Qwen3-0.6B's shapes (16 query heads, 8 KV heads, head_dim 128), a batch of
sequences with contexts drawn uniformly from a range, pages scattered at random; each variant (cache dtype, KV tile,
warps, pipeline stages, page layout) is timed from a replayed CUDA graph. Bytes counted: the K and V each sequence reads, plus q
and the output. Each row also gives the largest error against a float64 reference over the same (dequantized)
cache.

    python -m nanovllm.benchmarks.kv_decode --batch 256 --context 100 2048

``--layout head-major`` stores each page as ``[kv_heads, page_size, head_dim]`` (the kernel reads a strided view of
it): one program's tokens of a page are then contiguous, 2 KB per FP8 page instead of 128-byte rows 1 KB apart.
"""
from __future__ import annotations

import argparse
import itertools
import logging

import torch

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> list[dict]:
    from nanovllm.benchmarks.roofline import measure_ceilings, time_cuda_graph
    from nanovllm.kernels.paged_decode import paged_decode

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, nargs=2, default=(100, 2048), metavar=("MIN", "MAX"))
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--block-n", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-stages", type=int, nargs="+", default=[2])
    parser.add_argument("--layout", nargs="+", default=["token-major"], choices=["token-major", "head-major"],
                        help="how a page holds its tokens: [page_size, kv_heads, head_dim] (the engine's) or "
                             "[kv_heads, page_size, head_dim]")
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp8_e4m3"], choices=["bf16", "fp8_e4m3"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kv_decode needs a CUDA GPU")

    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.context[0], args.context[1] + 1, (args.batch,), generator=gen)
    pages_per_seq = (lens + args.block_size - 1) // args.block_size
    num_pages = int(pages_per_seq.sum())
    table = torch.zeros(args.batch, int(pages_per_seq.max()), dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    start = 0
    for i, n in enumerate(pages_per_seq.tolist()):
        table[i, :n] = perm[start:start + n]
        start += n
    device = torch.device("cuda")
    table, seq_lens = table.to(device), lens.to(torch.int32).to(device)
    order = torch.argsort(seq_lens, descending=True).to(torch.int32)
    shape = (num_pages, args.block_size, args.num_kv_heads, args.head_dim)
    bf16_k = torch.randn(shape, device=device, dtype=torch.bfloat16)
    bf16_v = torch.randn(shape, device=device, dtype=torch.bfloat16)
    variants = []
    for layout, dtype in itertools.product(args.layout, args.dtype):
        k, v = (bf16_k, bf16_v) if dtype == "bf16" else (bf16_k.to(torch.float8_e4m3fn), bf16_v.to(torch.float8_e4m3fn))
        if layout == "head-major":  # the same values, stored head by head within each page
            k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
        variants.append((dtype if layout == "token-major" else f"{dtype}/head-major", k, v))
    ones = torch.ones(1, device=device)
    q = torch.randn(args.batch, args.num_heads, args.head_dim, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    copy_bandwidth = measure_ceilings().copy_bandwidth
    tokens = int(lens.sum())
    results = []
    references = {}
    for (name, k, v), block_n, num_warps, num_stages in itertools.product(
            variants, args.block_n, args.num_warps, args.num_stages):
        def call() -> None:
            paged_decode(q, k, v, table, seq_lens, args.head_dim ** -0.5, out=out, block_n=block_n,
                         num_warps=num_warps, num_stages=num_stages, order=order, k_scale=ones, v_scale=ones)

        if k.data_ptr() not in references:
            references[k.data_ptr()] = _reference(q, k, v, table, lens, args.head_dim ** -0.5)
        call()
        error = (out.double() - references[k.data_ptr()]).abs().max().item()
        seconds = time_cuda_graph(call)
        moved = 2 * tokens * args.num_kv_heads * args.head_dim * k.element_size() + 2 * q.numel() * q.element_size()
        results.append({"variant": name, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages,
                        "us": seconds * 1e6, "max_abs_error": error, "bandwidth_gbs": moved / seconds / 1e9,
                        "of_copy_bandwidth": moved / seconds / copy_bandwidth})
    print(f"batch {args.batch}, contexts U{list(args.context)} ({tokens:,} tokens), heads {args.num_heads}/"
          f"{args.num_kv_heads} x {args.head_dim}, copy bandwidth {copy_bandwidth / 1e9:,.0f} GB/s "
          f"({torch.cuda.get_device_name()})")
    for r in results:
        print(f"{r['variant']:>9}  block_n {r['block_n']:>3}  warps {r['num_warps']}  stages {r['num_stages']}  "
              f"{r['us']:8.1f} us  {r['bandwidth_gbs']:7.0f} GB/s  {r['of_copy_bandwidth']:6.1%} of copy  "
              f"max error {r['max_abs_error']:.2e}")
    return results


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 attention of each row over its pages of the (dequantized) cache."""
    from nanovllm.layers.attention.torch_backend import gather_kv

    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    for row, length in enumerate(lens.tolist()):
        pages = table[row, :(length + block_size - 1) // block_size].long()
        k = gather_kv(k_cache, pages, length).double().repeat_interleave(group, dim=1)  # [T, Hq, D]
        v = gather_kv(v_cache, pages, length).double().repeat_interleave(group, dim=1)
        weights = torch.einsum("hd,thd->ht", q[row].double(), k).mul(scale).softmax(dim=-1)
        out[row] = torch.einsum("ht,thd->hd", weights, v)
    return out


if __name__ == "__main__":
    main()
