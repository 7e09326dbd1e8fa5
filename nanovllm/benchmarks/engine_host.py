"""The engine's host work per step without a model: scheduling, the step's host arrays, folding tokens back in.

On a GPU the host's share of a decode step (about 3-4 ms at batch 256, ``bench throughput``) hides behind the
device's only while it is the shorter of the two; a faster device step (an FP8 KV cache) exposes it. This runs the
real input processor, engine core and output processor on the throughput benchmark's workload with the executor
replaced by a stub that answers at once, so what is timed is the engine's own Python, on any machine. The model
runner's host work (copies, graph launches) is not in it.

    python -m nanovllm.benchmarks.engine_host                # 256 requests, 100-1024 tokens in and out
    python -m nanovllm.benchmarks.engine_host --profile 30   # and the 30 costliest functions (cProfile)

Prints the mean host time per step of the core (``EngineCore.step``) and of the output processor, for all steps
and for the decode steps by batch size.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from nanovllm.benchmarks.throughput_datasets import nano_vllm_workload
from nanovllm.config import EngineConfig
from nanovllm.engine.engine_core import EngineCore
from nanovllm.engine.input_processor import InputProcessor
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.executor.base import LaunchedStep, ModelOutput
from nanovllm.executor.input_batch import HostBatch
from nanovllm.sampling_params import SamplingParams

_BUCKETS = ((1, 64), (65, 128), (129, 256), (257, 1 << 30))


class StubExecutor:
    """An ``Executor`` whose steps finish at once with random tokens."""

    device_type = "cpu"
    num_micro_batches = 1
    samples_later = False

    def __init__(self, num_kv_blocks: int, vocab_size: int) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.rng = np.random.default_rng(0)
        self.vocab_size = vocab_size

    def launch(self, batch: HostBatch) -> LaunchedStep:
        step = LaunchedStep.for_batch(batch)
        step.token_ids = self.rng.integers(0, self.vocab_size, batch.num_sampled)
        return step

    def sample(self, step: LaunchedStep, grammar_bitmask: np.ndarray) -> None:
        raise NotImplementedError("the stub samples at launch")

    def collect(self, step: LaunchedStep) -> ModelOutput:
        return ModelOutput(token_ids=step.token_ids.tolist())

    def take_wait_time(self) -> float:
        return 0.0

    def model_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass


@dataclass
class _Timings:
    core_ms: list[float] = field(default_factory=list)
    output_ms: list[float] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)  # requests in the step (decode steps only, else 0)
    num_generated: int = 0
    num_expected: int = 0  # the workload's output tokens


def run(args: argparse.Namespace) -> _Timings:
    vocab_size = 151936  # Qwen3's, as bench throughput's default model
    config = EngineConfig(model="stub", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, async_scheduling=not args.no_overlap)
    config.finalize(SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=args.max_model_len))
    workload = nano_vllm_workload(args.num_prompts, (100, 1024), (100, 1024), seed=args.seed)
    pages = sum(-(-(len(p) + n) // config.block_size) for p, n in zip(workload.prompts, workload.max_tokens))
    core = EngineCore(config, StubExecutor(pages + args.num_prompts, vocab_size))
    inputs = InputProcessor(config, None, frozenset(), core.num_kv_pages)
    outputs = OutputProcessor(None)
    for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.max_tokens)):
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
        request = inputs.process(str(i), prompt, params)
        outputs.add_request(request, stream=False)
        for spec in request.engine_requests:
            core.add_request(spec)
    timings = _Timings()
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    while core.has_unfinished():
        running = core.scheduler.num_running
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in core.scheduler.running)
        start = time.perf_counter()
        step_outputs = core.step()
        stepped = time.perf_counter()
        outputs.process(step_outputs)
        timings.core_ms.append(1e3 * (stepped - start))
        timings.output_ms.append(1e3 * (time.perf_counter() - stepped))
        timings.batch.append(running if decoding and not core.scheduler.num_waiting else 0)
    timings.num_generated, timings.num_expected = core.stats.num_generated_tokens, sum(workload.max_tokens)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return timings


def summarise(timings: _Timings) -> dict[str, Any]:
    core, output, batch = map(np.asarray, (timings.core_ms, timings.output_ms, timings.batch))
    groups = {"all steps": np.ones_like(batch, dtype=bool)}
    groups.update({f"decode {lo}-{hi}" if hi < 1 << 30 else f"decode {lo}+": (batch >= lo) & (batch <= hi)
                   for lo, hi in _BUCKETS})
    steps = {name: {"steps": int(mask.sum()), "core_ms": float(core[mask].mean()),
                    "output_ms": float(output[mask].mean())}
             for name, mask in groups.items() if mask.any()}
    return {"steps": steps, "generated_tokens": timings.num_generated, "expected_tokens": timings.num_expected}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-overlap", action="store_true", help="schedule as on a CPU (default: as on CUDA)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most time of their own")
    summary = summarise(run(parser.parse_args(argv)))
    print(f"generated {summary['generated_tokens']} of the workload's {summary['expected_tokens']} output tokens")
    for name, row in summary["steps"].items():
        print(f"{name:<16} {row['steps']:>6} steps  core {row['core_ms']:6.3f} ms  output {row['output_ms']:6.3f} ms")
    return summary


if __name__ == "__main__":
    main()
