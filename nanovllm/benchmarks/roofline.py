"""The device's measured ceilings and the fastest a workload could possibly run on them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DeviceCeilings:
    copy_bandwidth: float  # bytes/s, counting bytes read plus bytes written
    matmul_flops: float  # bf16 FLOP/s


def time_cuda(fn, repeats: int = 10) -> float:
    """Device seconds per call of ``fn`` after one warm-up call, from events around ``repeats`` calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def time_cuda_graph(fn, repeats: int = 50) -> float:
    """Device seconds per call of ``fn`` captured into a CUDA graph and replayed (launch cost excluded)."""
    import triton.testing

    fn()
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=repeats, return_mode="median") / 1e3


def measure_ceilings() -> DeviceCeilings:
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = time_cuda(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_s = time_cuda(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    return DeviceCeilings(copy_bandwidth=2 * (1 << 30) / copy_s, matmul_flops=2 * 8192**3 / matmul_s)


def throughput_floor(llm, prompts: list[list[int]], output_lens: list[int], ceilings: DeviceCeilings) -> float:
    """Seconds: every decode step reads the weights and all live KV once; prefill runs at the matmul ceiling.

    Assumes every request is live from the first step, which minimises the number of steps, so it is a floor."""
    info = llm.model_info()
    prompt_lens = np.array([len(p) for p in prompts], dtype=np.int64)
    outputs = np.array(output_lens, dtype=np.int64)
    kv_tokens = 0
    for step in range(1, int(outputs.max()) + 1):
        live = outputs >= step
        kv_tokens += int((prompt_lens[live] + step - 1).sum())
    decode_bytes = int(outputs.max()) * info["weight_bytes"] + kv_tokens * info["kv_bytes_per_token"]
    prefill_flops = 2 * info["num_matmul_params"] * int(prompt_lens.sum())
    return decode_bytes / ceilings.copy_bandwidth + prefill_flops / ceilings.matmul_flops
