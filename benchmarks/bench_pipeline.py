"""Pipeline parallelism with and without micro-batches in flight, on whatever device is given (CPU by default).

    python benchmarks/bench_pipeline.py            # one process, PP=2 one batch at a time, PP=2 micro-batched

An 8-layer Qwen3 (hidden 512) with random weights, 32 prompts of 64 tokens, 64 greedy output tokens each. "One batch
at a time" turns the engine's micro-batching off after start-up, to show what the pipelining buys.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from nanovllm import LLM, SamplingParams
from nanovllm.testing import build_checkpoint


def run(path: str, device: str, pp: int, micro_batches: bool) -> tuple[float, int]:
    llm = LLM(path, device=device, dtype="float32", pipeline_parallel_size=pp, max_model_len=512,
              cpu_kv_cache_gib=0.2)
    core = llm.engine.core
    if not micro_batches:
        core.scheduler.num_micro_batches = core.num_micro_batches = 1
        core.max_in_flight = 0
    prompts = [[(i * 7 + j) % 500 + 3 for j in range(64)] for i in range(32)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    steps = core.stats.num_steps
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    return sum(len(o.token_ids) for o in outputs) / elapsed, core.stats.num_steps - steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    path = build_checkpoint(tempfile.mkdtemp(prefix="nanovllm-pp-"), "Qwen3ForCausalLM", hidden_size=512,
                            intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64)
    for name, pp, micro in (("one process", 1, True), ("PP=2, one batch at a time", 2, False),
                            ("PP=2, micro-batches", 2, True)):
        tok_s, steps = run(path, args.device, pp, micro)
        print(f"{name:28} {tok_s:8.0f} output tok/s  {steps} steps")


if __name__ == "__main__":
    main()
