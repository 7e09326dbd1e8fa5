"""Where a step's time goes, part by part, on one GPU (Qwen3-0.6B shape, dummy weights).

Decode: every piece of one decoder layer, the LM head and the sampler, each timed inside a CUDA graph (as the
engine runs them, so launch cost is excluded and what remains is device time plus the gaps between kernels), at a
few batch sizes with contexts drawn like the throughput workload's. The sum of 28 layers plus head and sampler is
set against the replay of the engine's own captured graph for that batch.

Prefill: one eager forward of 16 prompts of 1,024 tokens (the benchmark's prefill steps), its host time (the
forward returns before the device is done) against its device time, and the kernels that cost most.

    python benchmarks/bench_step_parts.py                # needs CUDA
    python benchmarks/bench_step_parts.py --batches 16 256
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch

from nanovllm import LLM
from nanovllm.benchmarks.roofline import time_cuda, time_cuda_graph
from nanovllm.layers.attention.context import set_forward_context
from nanovllm.layers.attention.metadata import AttentionMetadata, KVWrite
from nanovllm.layers.sampler import SamplingBatch
from nanovllm.testing import write_config_only


def decode_meta(runner, batch: int, gen: torch.Generator) -> AttentionMetadata:
    block = runner.block_size
    seq_lens = torch.randint(100, 2048, (batch,), generator=gen).to(torch.int32)
    max_pages = -(-int(seq_lens.max()) // block)
    pages = torch.randint(0, runner.num_kv_blocks, (batch, max_pages), generator=gen)  # may repeat: timing only
    positions = seq_lens.long() - 1
    slots = pages[torch.arange(batch), positions // block] * block + positions % block
    device = runner.device
    return AttentionMetadata(
        slot_mapping=slots.to(device), query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=seq_lens.to(device), block_tables=pages.to(torch.int32).to(device), max_query_len=1,
        max_seq_len=int(seq_lens.max()),
        decode_order=torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32).to(device),
    )


@torch.inference_mode()
def decode_parts(runner, batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    meta = decode_meta(runner, batch, gen)
    model = runner.model
    layer = model.model.layers[0]
    attn = layer.self_attn
    hidden_size = model.config.hidden_size
    device, dtype = runner.device, runner.dtype
    x = torch.randn(batch, hidden_size, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    positions = meta.seq_lens.long() - 1
    qkv = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q3 = q.view(-1, attn.num_heads, attn.head_dim)
    k3 = k.view(-1, attn.num_kv_heads, attn.head_dim)
    v3 = v.view(-1, attn.num_kv_heads, attn.head_dim)
    kv_write = KVWrite(v3, attn.attn.k_cache, attn.attn.v_cache, meta.slot_mapping)
    o_in = torch.randn(batch, attn.num_heads * attn.head_dim, device=device, dtype=dtype)
    gate_up = layer.mlp.gate_up_proj(x)
    act = layer.mlp.act_fn(gate_up)
    logits = model.compute_logits(x)
    sampling = SamplingBatch(
        temperatures=torch.full((batch,), 0.6, device=device), top_ks=torch.full((batch,), 0, device=device),
        top_ps=torch.ones(batch, device=device), min_ps=torch.zeros(batch, device=device),
        keys=torch.arange(batch, device=device), all_greedy=False, use_top_k_top_p=False, use_min_p=False,
    )
    backend = runner.backend
    with set_forward_context(meta, backend):  # as the engine would: maybe split-K partials
        o_out, down_out = attn.o_proj(o_in), layer.mlp.down_proj(act)
    parts: dict[str, Callable[[], object]] = {
        "add_rms_norm": lambda: layer.input_layernorm(down_out, residual),
        "qkv_proj": lambda: attn.qkv_proj(x),
        # as in the engine: the rotary kernel also writes the new K/V into the cache
        "norm_rope_kv": lambda: attn.rotary_emb(positions, q3, k3, (attn.q_norm, attn.k_norm), kv_write),
        "attention": lambda: backend.attend(q3, attn.attn.k_cache, attn.attn.v_cache, meta, attn.attn.scale),
        "o_proj": lambda: attn.o_proj(o_in),
        "post_norm": lambda: layer.post_attention_layernorm(o_out, residual),
        "gate_up_proj": lambda: layer.mlp.gate_up_proj(x),
        "silu_and_mul": lambda: layer.mlp.act_fn(gate_up),
        "down_proj": lambda: layer.mlp.down_proj(act),
    }
    tail = {"lm_head": lambda: model.compute_logits(x), "sampler": lambda: runner.sampler(logits, sampling)}
    with set_forward_context(meta, backend):
        times = {name: 1e3 * time_cuda_graph(fn) for name, fn in {**parts, **tail}.items()}
    num_layers = len(model.model.layers)
    layer_ms = sum(times[name] for name in parts)
    total = num_layers * layer_ms + times["lm_head"] + times["sampler"]
    print(f"\n== decode, batch {batch} (contexts U[100, 2048), mean {meta.seq_lens.float().mean():.0f})")
    for name, ms in times.items():
        print(f"  {name:14s} {1e3 * ms:8.1f} us")
    print(f"  one layer      {1e3 * layer_ms:8.1f} us;  {num_layers} layers + head + sampler = {total:.3f} ms")
    graphs = runner.graphs
    if graphs is not None and batch in graphs.graphs:
        graphs.seq_lens[:batch].copy_(meta.seq_lens)
        graphs.block_tables[:batch, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        graphs.slot_mapping[:batch].copy_(meta.slot_mapping)
        graphs.positions[:batch].copy_(positions)
        graphs.decode_order[:batch].copy_(meta.decode_order)
        replay = 1e3 * time_cuda(graphs.graphs[batch].replay, repeats=50)  # a graph cannot be captured again
        print(f"  engine graph   {replay:.3f} ms (model + LM head), parts sum without sampler "
              f"{total - times['sampler']:.3f} ms")
        graph_kernels(graphs.graphs[batch].replay, replay)


def graph_kernels(replay: Callable[[], None], replay_ms: float, repeats: int = 5) -> None:
    """The kernels inside a replay of the engine's graph, by total device time; what is left of the replay's time
    is the gaps between kernels (each kernel's launch, ramp and tail)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.count / repeats, e.self_device_time_total / repeats / 1e3) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    rows.sort(key=lambda row: -row[2])
    busy = sum(ms for _, _, ms in rows)
    count = sum(n for _, n, _ in rows)
    print(f"  inside it      {count:.0f} kernels busy {busy:.3f} ms; gaps between them {replay_ms - busy:.3f} ms")
    for name, n, ms in rows[:10]:
        print(f"    {ms:7.3f} ms  {n:4.0f} x  {name[:70]}")


@torch.inference_mode()
def prefill_host(runner, num_prompts: int = 16, prompt_len: int = 1024) -> None:
    device = runner.device
    block = runner.block_size
    pages_each = -(-prompt_len // block)
    pages = torch.arange(num_prompts * pages_each, dtype=torch.int32).view(num_prompts, pages_each)
    positions = torch.arange(prompt_len).repeat(num_prompts)
    rows = torch.arange(num_prompts).repeat_interleave(prompt_len)
    slots = pages[rows, positions // block].long() * block + positions % block
    lens = [prompt_len] * num_prompts
    meta = AttentionMetadata(
        slot_mapping=slots.to(device),
        query_start_loc=torch.arange(0, prompt_len * (num_prompts + 1), prompt_len, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=pages.to(device),
        max_query_len=prompt_len, max_seq_len=prompt_len, query_lens_cpu=lens, seq_lens_cpu=lens,
    )
    input_ids = torch.randint(0, 10000, (num_prompts * prompt_len,), device=device)
    positions = positions.to(device)

    def forward() -> torch.Tensor:
        with set_forward_context(meta, runner.backend):
            hidden = runner.model(input_ids, positions)
        return runner.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])

    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    host, device_ms = [], []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        forward()
        host.append(1e3 * (time.perf_counter() - t0))
        end.record()
        torch.cuda.synchronize()
        device_ms.append(start.elapsed_time(end))
    print(f"\n== prefill, {num_prompts} x {prompt_len} tokens, eager: host {min(host):.1f} ms, "
          f"device {min(device_ms):.1f} ms (best of 5)")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args()
    path = write_config_only(tempfile.mkdtemp(prefix="nanovllm-parts-"), "qwen3-0.6b")
    llm = LLM(path, load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.5)
    runner = llm.engine.core.executor
    print(torch.cuda.get_device_name())
    for batch in args.batches:
        decode_parts(runner, batch)
    prefill_host(runner)


if __name__ == "__main__":
    main()
