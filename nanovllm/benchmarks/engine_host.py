"""The engine's host work per step without a model: scheduling, the step's host arrays, folding tokens back in.

On a GPU the host's share of a decode step (about 3-4 ms at batch 256, ``bench throughput``) hides behind the
device's only while it is the shorter of the two; a faster device step (an FP8 KV cache) exposes it. This runs the
real input processor, engine core and output processor on the throughput benchmark's workload with the executor
replaced by a stub that answers at once, so what is timed is the engine's own Python, on any machine. The model
runner's host work (copies, graph launches) is not in it.

    python -m nanovllm.benchmarks.engine_host                # 256 requests, 100-1024 tokens in and out
    python -m nanovllm.benchmarks.engine_host --profile 30   # and the 30 costliest functions (cProfile)
    python -m nanovllm.benchmarks.engine_host --structured-fraction 0.5 --tokenizer DIR

With ``--structured-fraction`` every ``1 / F``-th request follows bench throughput's JSON schema, and the stub
samples those rows from their grammar's bitmask as the GPU executor does (after the launch, once the bitmask is
made), so the grammar work lands on the step loop as on a GPU. The stub's own time (drawing the tokens, which
stands for the device's) is not counted.

Prints the mean host time per step of the core (``EngineCore.step``, as ``step_trace.StepRecorder`` records it for
bench throughput) and of the output processor, for all steps and per kind of step.
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

from nanovllm.benchmarks.step_trace import StepRecord, StepRecorder, step_kind
from nanovllm.benchmarks.throughput import constrain
from nanovllm.benchmarks.throughput_datasets import nano_vllm_workload
from nanovllm.config import EngineConfig
from nanovllm.engine.engine_core import EngineCore
from nanovllm.engine.input_processor import InputProcessor
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.executor.base import LaunchedStep, ModelOutput
from nanovllm.executor.input_batch import HostBatch
from nanovllm.sampling_params import SamplingParams

class StubExecutor:
    """An ``Executor`` whose steps finish at once with random tokens; a constrained row's token is one its
    bitmask allows. Like the GPU executor it takes a constrained step's bitmask after the launch (``sample``)."""

    device_type = "cpu"
    num_micro_batches = 1
    samples_later = True

    def __init__(self, num_kv_blocks: int, vocab_size: int) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.rng = np.random.default_rng(0)
        self.vocab_size = vocab_size
        self.stub_time = 0.0  # spent here since the engine last asked: it stands for the device, so it is waiting

    def launch(self, batch: HostBatch) -> LaunchedStep:
        start = time.perf_counter()
        step = LaunchedStep.for_batch(batch)
        step.token_ids = self.rng.integers(0, self.vocab_size, batch.num_sampled)
        if batch.sampling is not None and batch.sampling.grammar_rows is not None:
            step.unsampled = (None, batch.sampling.grammar_rows)
        self._spent(start)
        return step

    def sample(self, step: LaunchedStep, grammar_bitmask: np.ndarray) -> None:
        start = time.perf_counter()
        (_, rows), step.unsampled = step.unsampled, None
        for row, mask in zip(rows, grammar_bitmask):
            words = np.flatnonzero(mask)  # a random allowed token: a random non-empty word, a random bit of it
            word = int(words[self.rng.integers(len(words))])
            bits = [b for b in range(32) if (int(mask[word]) >> b) & 1]
            step.token_ids[row] = 32 * word + bits[self.rng.integers(len(bits))]
        self._spent(start)

    def _spent(self, start: float) -> None:
        self.stub_time += time.perf_counter() - start

    def collect(self, step: LaunchedStep) -> ModelOutput:
        return ModelOutput(token_ids=step.token_ids.tolist())

    def take_wait_time(self) -> float:
        wait, self.stub_time = self.stub_time, 0.0
        return wait

    def model_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass


@dataclass
class _Timings:
    steps: list[StepRecord] = field(default_factory=list)  # the core's steps (host time: the stub's excluded)
    output_ms: list[float] = field(default_factory=list)  # the output processor, per step
    num_generated: int = 0
    num_expected: int = 0  # the workload's output tokens
    finish_reasons: dict[str, int] = field(default_factory=dict)


def run(args: argparse.Namespace) -> _Timings:
    vocab_size = 151936  # Qwen3's, as bench throughput's default model
    config = EngineConfig(model="stub", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, async_scheduling=not args.no_overlap)
    config.finalize(SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=args.max_model_len))
    workload = nano_vllm_workload(args.num_prompts, (100, 1024), (100, 1024), seed=args.seed)
    pages = sum(-(-(len(p) + n) // config.block_size) for p, n in zip(workload.prompts, workload.max_tokens))
    tokenizer = None
    if args.structured_fraction > 0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    executor = StubExecutor(pages + args.num_prompts, vocab_size)
    core = EngineCore(config, executor, load_tokenizer=lambda: tokenizer)
    inputs = InputProcessor(config, tokenizer, frozenset(), core.num_kv_pages)
    outputs = OutputProcessor(None)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in workload.max_tokens]
    constrain(params, args.structured_fraction)
    if args.structured_fraction > 0:
        _wait_for_grammar(core, params)
    for i, (prompt, request_params) in enumerate(zip(workload.prompts, params)):
        request = inputs.process(str(i), prompt, request_params)
        outputs.add_request(request, stream=False)
        for spec in request.engine_requests:
            core.add_request(spec)
    timings = _Timings()
    recorder = StepRecorder(core)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    while core.has_unfinished():
        step_outputs = core.step()
        stepped = time.perf_counter()
        for output in outputs.process(step_outputs).outputs:
            for completion in output.outputs:
                if completion.finish_reason is not None:
                    reasons = timings.finish_reasons
                    reasons[completion.finish_reason] = reasons.get(completion.finish_reason, 0) + 1
        timings.output_ms.append(1e3 * (time.perf_counter() - stepped))
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    recorder.detach()
    timings.steps = recorder.records
    timings.num_generated, timings.num_expected = core.stats.num_generated_tokens, sum(workload.max_tokens)
    return timings


def _wait_for_grammar(core: EngineCore, params: list[SamplingParams]) -> None:
    """Compile the schema before the timed run (the compile is cached per schema), as bench throughput's warm-up
    does."""
    spec = next(p.structured_outputs for p in params if p.structured_outputs is not None)
    state = core.structured.start(spec, frozenset())
    state.compiled.exception(timeout=300)
    core.structured.poll(state)
    if state.error is not None:
        raise ValueError(f"the benchmark's schema did not compile: {state.error}")


def summarise(timings: _Timings) -> dict[str, Any]:
    """Per kind of step (bench throughput's kinds) and over all: how many, the mean host time in the core and in
    the output processor."""
    core = np.asarray([record.host_ms for record in timings.steps])
    output = np.asarray(timings.output_ms)
    kinds = np.asarray([step_kind(record) for record in timings.steps])
    groups = {"all steps": np.ones(len(kinds), dtype=bool)}
    groups.update({kind: kinds == kind for kind in dict.fromkeys(kinds)})  # in order of first appearance
    steps = {name: {"steps": int(mask.sum()), "core_ms": float(core[mask].mean()),
                    "output_ms": float(output[mask].mean())}
             for name, mask in groups.items()}
    return {"steps": steps, "generated_tokens": timings.num_generated, "expected_tokens": timings.num_expected,
            "finish_reasons": timings.finish_reasons}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-overlap", action="store_true", help="schedule as on a CPU (default: as on CUDA)")
    parser.add_argument("--structured-fraction", type=float, default=0.0,
                        help="share of the requests under bench throughput's JSON schema (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory, for --structured-fraction")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most time of their own")
    args = parser.parse_args(argv)
    if args.structured_fraction > 0 and not args.tokenizer:
        parser.error("--structured-fraction needs --tokenizer")
    summary = summarise(run(args))
    print(f"generated {summary['generated_tokens']} of the workload's {summary['expected_tokens']} output tokens; "
          f"requests ended by {summary['finish_reasons']}")
    for name, row in summary["steps"].items():
        print(f"{name:<16} {row['steps']:>6} steps  core {row['core_ms']:6.3f} ms  output {row['output_ms']:6.3f} ms")
    return summary


if __name__ == "__main__":
    main()
