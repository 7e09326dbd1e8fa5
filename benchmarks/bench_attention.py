"""Microbenchmark of the Triton attention kernels (paged decode, paged prefill) on one GPU.

Decode: a batch of sequences with uniform random context lengths; reports the median time
(triton.testing.do_bench) and the achieved bandwidth (K+V actually read + q + out) against a measured
device-to-device copy (bytes read + written). Prefill: a mixed batch (fresh prompts + decodes) and a
fresh-prompt batch, the latter also through torch's scaled_dot_product_attention per request.

    python benchmarks/bench_attention.py                      # Qwen3-0.6B shapes, bf16, batch 256
    python benchmarks/bench_attention.py --splits 1 2 4 8 16 --block-n 32 64 128 --warps 4 8
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke   # tiny sizes on CPU: syntax check
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanovllm.kernels.paged_decode import alloc_decode_workspace, paged_decode
from nanovllm.kernels.paged_prefill import paged_prefill

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds; on CPU (interpreter smoke run) a single timed call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def paged_kv(seq_lens: list[int], page: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device, gen: torch.Generator, head_major: bool = False):
    """Random caches holding exactly the needed pages, and a block table of shuffled pages."""
    pages = [math.ceil(s / page) for s in seq_lens]
    perm = torch.randperm(sum(pages), generator=gen)
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used:used + n]
        used += n
    if head_major:  # each (page, head) holds its tokens contiguously; the kernels see the same [P, S, H, D] view
        shape = (sum(pages), num_kv_heads, page, head_dim)
        k = torch.randn(shape, dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(shape, dtype=dtype, device=device).transpose(1, 2)
    else:
        shape = (sum(pages), page, num_kv_heads, head_dim)
        k = torch.randn(shape, dtype=dtype, device=device)
        v = torch.randn(shape, dtype=dtype, device=device)
    return k, v, table.to(device)


def bench_decode(args, device, dtype, copy_gbs) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(args.min_ctx, args.max_ctx + 1, (args.batch,), generator=gen).tolist()
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = torch.randn(args.batch, args.heads, args.head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    elt = q.element_size()
    nbytes = 2 * sum(seq_lens) * args.kv_heads * args.head_dim * elt + 2 * q.numel() * elt
    # "batch": programs start in batch order; "longest": longest contexts first, as the engine runs it
    orders = {"batch": None, "longest": torch.argsort(lens, descending=True, stable=True).to(torch.int32)}
    rows = []
    for page in args.pages:
        k_cache, v_cache, table = paged_kv(seq_lens, page, args.kv_heads, args.head_dim, dtype, device, gen,
                                           args.head_major)
        ws = alloc_decode_workspace(args.batch, args.heads, args.head_dim, max(args.splits), device)
        for splits, block_n, warps, stages, order in itertools.product(args.splits, args.block_n, args.warps,
                                                                       args.stages, args.order):
            fn = lambda: paged_decode(q, k_cache, v_cache, table, lens, args.head_dim ** -0.5,  # noqa: E731
                                      num_splits=splits, workspace=ws, out=out, block_n=block_n,
                                      num_warps=warps, num_stages=stages, order=orders[order])
            config = ("decode", page, splits, block_n, warps, stages, order)
            try:
                ms = bench(fn, device)
            except Exception as e:  # a config that does not compile (shared memory) is a row, not a crash
                rows.append((*config, float("nan"), 0.0, 0.0, type(e).__name__))
                continue
            gbs = nbytes / ms / 1e6
            rows.append((*config, ms * 1e3, gbs, gbs / copy_gbs, ""))
        del k_cache, v_cache
    return rows


def dense_per_request(q, k, v, q_lens, group):
    """Fresh prompts as dense ``[1, H, L, D]`` tensors (K/V expanded to all query heads), built once
    outside the timed region so SDPA is timed on its own."""
    out, start = [], 0
    for n in q_lens:
        qi = q[start:start + n].transpose(0, 1)[None].contiguous()
        ki = k[start:start + n].transpose(0, 1).repeat_interleave(group, 0)[None].contiguous()
        vi = v[start:start + n].transpose(0, 1).repeat_interleave(group, 0)[None].contiguous()
        out.append((qi, ki, vi))
        start += n
    return out


def sdpa_per_request(dense, scale):
    return [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale) for qi, ki, vi in dense]


def bench_prefill(args, device, dtype) -> list[tuple]:
    gen = torch.Generator().manual_seed(1)
    page, scale = args.pages[0], args.head_dim ** -0.5
    group = args.heads // args.kv_heads
    prompt = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=gen).tolist()
    dec_ctx = torch.randint(args.min_ctx, args.max_ctx + 1, (args.decodes,), generator=gen).tolist()
    rows = []
    for label, seq_lens, q_lens in [
        ("prefill", prompt, prompt),
        ("mixed", prompt + dec_ctx, prompt + [1] * len(dec_ctx)),
    ]:
        k_cache, v_cache, table = paged_kv(seq_lens, page, args.kv_heads, args.head_dim, dtype, device, gen)
        q = torch.randn(sum(q_lens), args.heads, args.head_dim, dtype=dtype, device=device)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(device)
        # QK^T and PV over the causally visible keys: row j of a request sees ctx + j + 1 of them
        visible = sum((s - n) * n + n * (n + 1) // 2 for s, n in zip(seq_lens, q_lens))
        tflop = 4 * args.heads * args.head_dim * visible / 1e12
        for block_m, block_n, warps in itertools.product(args.block_m, args.block_n, args.warps):
            fn = lambda: paged_prefill(q, k_cache, v_cache, table, lens, qsl, scale,  # noqa: E731
                                       block_m=block_m, block_n=block_n, num_warps=warps)
            ms = bench(fn, device)
            rows.append((label, page, block_m, block_n, warps, ms * 1e3, tflop / ms * 1e3, ""))
        if label == "prefill":
            # same fresh prompts through SDPA: gather each prompt's K/V into dense tensors once
            k = torch.cat([k_cache[table[i, :math.ceil(n / page)].long()].flatten(0, 1)[:n] for i, n in enumerate(prompt)])
            v = torch.cat([v_cache[table[i, :math.ceil(n / page)].long()].flatten(0, 1)[:n] for i, n in enumerate(prompt)])
            dense = dense_per_request(q, k, v, prompt, group)
            ms = bench(lambda: sdpa_per_request(dense, scale), device)
            ref = torch.cat([o[0].transpose(0, 1) for o in sdpa_per_request(dense, scale)]).float()
            got = paged_prefill(q, k_cache, v_cache, table, lens, qsl, scale).float()
            err = ((got - ref).norm() / ref.norm()).item()
            rows.append(("prefill-sdpa", page, "-", "-", "-", ms * 1e3, tflop / ms * 1e3,
                         f"rel.diff triton vs sdpa {err:.1e}"))
        del k_cache, v_cache
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter syntax check)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--min-ctx", type=int, default=100)
    p.add_argument("--max-ctx", type=int, default=2048)
    p.add_argument("--pages", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--block-n", type=int, nargs="+", default=[64], help="KV tile, decode and prefill")
    p.add_argument("--block-m", type=int, nargs="+", default=[64])
    p.add_argument("--warps", type=int, nargs="+", default=[4])
    p.add_argument("--stages", type=int, nargs="+", default=[2])
    p.add_argument("--order", nargs="+", choices=["batch", "longest"], default=["batch", "longest"],
                   help="decode programs start in batch order, or longest context first")
    p.add_argument("--prompts", type=int, default=8, help="fresh prompts in the prefill batches")
    p.add_argument("--prompt-min", type=int, default=512)
    p.add_argument("--prompt-max", type=int, default=2048)
    p.add_argument("--decodes", type=int, default=128, help="decode rows added to the mixed batch")
    p.add_argument("--head-major", action="store_true",
                   help="cache pages laid out [head, token, dim] in memory instead of [token, head, dim]")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.heads, args.kv_heads, args.head_dim = 3, 4, 2, 64
        args.min_ctx, args.max_ctx, args.pages, args.splits = 10, 40, [16], [1, 2]
        args.prompts, args.prompt_min, args.prompt_max, args.decodes = 2, 5, 20, 2
        args.block_n, args.block_m, args.warps, args.stages = [32], [32], [4], [2]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth(device, (1 << 20) if args.smoke else (2 << 30))
    print(f"device: {name}; dtype {args.dtype}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    decode_rows = [] if args.skip_decode else bench_decode(args, device, dtype, copy_gbs)
    prefill_rows = [] if args.skip_prefill else bench_prefill(args, device, dtype)

    print(f"\npaged_decode: batch {args.batch}, heads {args.heads}/{args.kv_heads}, dim {args.head_dim}, "
          f"context U[{args.min_ctx}, {args.max_ctx}]")
    print(f"{'page':>5} {'splits':>6} {'blk_n':>5} {'warps':>5} {'stages':>6} {'order':>7} {'us':>9} {'GB/s':>7} "
          f"{'of copy':>7}")
    for _, page, splits, block_n, warps, stages, order, us, gbs, frac, note in decode_rows:
        print(f"{page:>5} {splits:>6} {block_n:>5} {warps:>5} {stages:>6} {order:>7} {us:>9.1f} {gbs:>7.0f} "
              f"{frac:>7.0%} {note}")
    print(f"\npaged_prefill: {args.prompts} prompts U[{args.prompt_min}, {args.prompt_max}] "
          f"(+{args.decodes} decodes in 'mixed'), page {args.pages[0]}")
    print(f"{'batch':>13} {'blk_m':>5} {'blk_n':>5} {'warps':>5} {'us':>9} {'TFLOP/s':>7}")
    for label, _, block_m, block_n, warps, us, tflops, note in prefill_rows:
        print(f"{label:>13} {block_m!s:>5} {block_n!s:>5} {warps!s:>5} {us:>9.1f} {tflops:>7.1f} {note}")


if __name__ == "__main__":
    main()
