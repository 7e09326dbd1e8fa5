"""``nanovllm bench throughput``: offline generation throughput, by default the original nano-vllm bench.py workload.

That workload: ``random.seed(0)``; 256 prompts of random token ids in [0, 10000] with lengths uniform in
[100, 1024]; then, for each, ``max_tokens`` uniform in [100, 1024]; temperature 0.6, ``ignore_eos``; one warm-up
generate before timing; Qwen3-0.6B's shape with dummy weights. (bench.py also set ``max_model_len=4096``; here
``--max-model-len`` defaults to what the model allows.) On CPU the same command runs a scaled-down case (8 prompts,
lengths in [8, 64]). ``--dataset-name random`` and ``sharegpt`` run vLLM's workloads instead
(``throughput_datasets.py``); flags are spelled as ``vllm bench throughput`` spells them. The engine flags are
``add_engine_args``'s, the same as ``nanovllm serve``'s; ``--seed`` seeds the workload too.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import tempfile
import time
from typing import Any, Iterator

import torch

from nanovllm.entrypoints.engine_args import add_engine_args, engine_kwargs
from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.benchmarks.lengths import Length, fit_lengths
from nanovllm.benchmarks.peer_hf import run_hf_continuous_batching
from nanovllm.benchmarks.roofline import DeviceCeilings, measure_ceilings, throughput_floor
from nanovllm.benchmarks.step_trace import GcWatch, JitWatch, StepRecorder, format_summary, summarise
from nanovllm.benchmarks.throughput_datasets import (
    DATASETS,
    Workload,
    fold_into_vocabulary,
    nano_vllm_workload,
    random_workload,
    sharegpt_workload,
)
from nanovllm.testing import PRESETS, write_config_only

logger = logging.getLogger(__name__)

__all__ = ["Workload", "add_arguments", "main", "nano_vllm_workload"]


# an open-ended list of records: a grammar with string, integer and enum states that a random model rarely closes
BENCH_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["records"], "properties": {
    "records": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                           "required": ["id", "name", "kind"], "properties": {
                                               "id": {"type": "integer", "minimum": 0, "maximum": 99999},
                                               "name": {"type": "string", "maxLength": 24},
                                               "kind": {"enum": ["alpha", "beta", "gamma"]}}}}}}


def constrain(params: list[SamplingParams], fraction: float) -> None:
    """Every ``1 / fraction``-th request follows ``BENCH_SCHEMA`` (the others are unchanged)."""
    if fraction <= 0:
        return
    from nanovllm.sampling_params import StructuredOutputsParams

    every = max(1, round(1 / fraction))
    for i in range(0, len(params), every):
        params[i].structured_outputs = StructuredOutputsParams(json=BENCH_SCHEMA)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b",
                        help=f"checkpoint directory, GGUF file, hub id, or a shape preset for dummy weights: "
                             f"{sorted(PRESETS)}")
    parser.add_argument("--dataset-name", choices=DATASETS, default="nano-vllm",
                        help="nano-vllm: the original bench.py workload; random: ids from the whole vocabulary, "
                             "lengths around --input-len/--output-len; sharegpt: a local ShareGPT JSON file")
    parser.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file for --dataset-name sharegpt")
    parser.add_argument("--num-prompts", type=int, default=None, help="default 256 (8 on CPU)")
    parser.add_argument("--n", type=int, default=1, help="samples generated per prompt")
    parser.add_argument("--input-len", type=int, default=None,
                        help="prompt length: fixed for nano-vllm (default: its range), the mean for random (default "
                             f"{RANDOM_LENGTHS[0][0]}, {RANDOM_LENGTHS[1][0]} on CPU)")
    parser.add_argument("--output-len", type=int, default=None,
                        help="output length: fixed for nano-vllm and sharegpt (default: the workload's), the mean for "
                             f"random (default {RANDOM_LENGTHS[0][1]}, {RANDOM_LENGTHS[1][1]} on CPU)")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in len * [1 - r, 1 + r], r in [0, 1)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also run HF transformers' continuous batching on the same workload (first, on the "
                             "empty GPU) and report the ratio")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="run the timed generate under the torch profiler; print the top ops, write a trace to DIR "
                             "(use a short workload, e.g. --input-len 512 --output-len 32)")
    parser.add_argument("--structured-fraction", type=float, default=0.0,
                        help="this share of the requests (every k-th) carries a JSON schema (structured outputs; "
                             "needs a tokenizer, e.g. --tokenizer DIR with dummy weights)")
    parser.add_argument("--output-json", default=None, help="write the figures to this file")
    parser.add_argument("--step-log", default=None, metavar="FILE",
                        help="write every step's wall and host time and batch to this JSON file")
    add_engine_args(parser)
    # the workload is drawn before the engine exists, and must not change from run to run (bench.py's seed 0)
    parser.set_defaults(seed=0)
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                        help=argparse.SUPPRESS)  # the old spelling of --no-enable-prefix-caching


RANDOM_LENGTHS = ((1024, 128), (32, 16))  # --dataset-name random's default (input, output): GPU, CPU


def _check(args: argparse.Namespace) -> None:
    for flag, value in (("--num-prompts", args.num_prompts), ("--n", args.n), ("--input-len", args.input_len),
                        ("--output-len", args.output_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if args.dataset_path and args.dataset_name != "sharegpt":
        raise ValueError(f"--dataset-path is read by --dataset-name sharegpt only, not {args.dataset_name}")
    if args.compare_hf and args.n != 1:
        raise ValueError("--compare-hf runs one sample per prompt on both engines: leave --n at 1")


def build_workload(args: argparse.Namespace, small: bool, vocab_size: int, tokenizer: Any,
                   max_model_len: int) -> Workload:
    """The requests of ``--dataset-name``, fitted to ``max_model_len`` (defaults shrink; given lengths that cannot
    fit are a ValueError)."""
    num_prompts = args.num_prompts or (8 if small else 256)
    if args.dataset_name == "sharegpt":
        return sharegpt_workload(args.dataset_path, num_prompts, tokenizer, max_model_len, args.output_len, args.seed)
    if args.dataset_name == "random":
        default_in, default_out = RANDOM_LENGTHS[small]
        input_len, output_len = fit_lengths(
            [Length("--input-len", args.input_len, default_in), Length("--output-len", args.output_len, default_out)],
            max_model_len, stretch=1 + args.random_range_ratio, limit_name="--max-model-len")
        return random_workload(num_prompts, input_len, output_len, args.random_range_ratio, vocab_size, args.seed)
    default_range = (8, 64) if small else (100, 1024)
    input_range = (args.input_len, args.input_len) if args.input_len else default_range
    output_range = (args.output_len, args.output_len) if args.output_len else default_range
    if input_range[1] + output_range[1] > max_model_len:
        raise ValueError(f"the nano-vllm workload's requests reach {input_range[1] + output_range[1]} tokens, more "
                         f"than --max-model-len {max_model_len}: give a shorter --input-len/--output-len")
    workload = nano_vllm_workload(num_prompts, input_range, output_range, args.seed)
    fold_into_vocabulary(workload, vocab_size)
    return workload


def engine_args(args: argparse.Namespace, device: str, preset: bool) -> dict[str, Any]:
    """``LLM``'s keyword arguments: the engine flags given, on the resolved ``device``."""
    kwargs = engine_kwargs(args)
    kwargs["device"] = device
    if preset:  # a preset is a config alone: there are no weights to load
        kwargs.setdefault("load_format", "dummy")
    return kwargs


def main(args: argparse.Namespace) -> dict:
    _check(args)
    device = args.device if args.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    small = device == "cpu"
    model, preset = args.model, args.model in PRESETS
    if preset:
        model = write_config_only(tempfile.mkdtemp(prefix="nanovllm-bench-"), model)
    workload, peer = None, None
    if args.compare_hf:  # the peer runs first, on a GPU nothing else holds yet (after our engine, its memory would
        workload = _peer_workload(args, small, model)  # still be cached)
        peer = _run_peer(model, workload, args.temperature, device)
    logger.info("loading %s on %s", args.model, device)
    llm = LLM(model, **engine_args(args, device, preset))
    max_model_len = llm.engine.config.max_model_len
    if workload is None:
        workload = build_workload(args, small, llm.engine.config.hf_config.vocab_size, llm.tokenizer, max_model_len)
    elif workload.longest() > max_model_len:
        raise ValueError(f"requests reach {workload.longest()} tokens, more than --max-model-len {max_model_len}")
    num_prompts = len(workload.prompts)
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=n, n=args.n)
              for n in workload.max_tokens]
    constrain(params, args.structured_fraction)

    logger.info("warming up, then %d requests (%s workload)", num_prompts, args.dataset_name)
    warm_up = SamplingParams(max_tokens=16)
    constrain([warm_up], args.structured_fraction)  # (the tokenizer's grammar tables and the schema, built once)
    llm.generate([[1, 2, 3, 4]], warm_up, use_tqdm=False)
    stats_before = llm.stats()
    recorder, jit, collections = StepRecorder(llm.engine.core), JitWatch(), GcWatch()
    allocator_before = _allocator_counts(device)
    jit.start()
    collections.start()
    with _maybe_profile(args.profile, device):
        start = time.perf_counter()
        outputs = llm.generate(workload.prompts, params, use_tqdm=not args.disable_tqdm)
        elapsed = time.perf_counter() - start
    collections.stop()
    jit.stop()
    allocator_after = _allocator_counts(device)
    recorder.detach()
    stats_after = llm.stats()
    if args.step_log:
        recorder.save(args.step_log)

    prompt_tokens = sum(len(p) for p in workload.prompts)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)  # counted, not assumed
    steps = stats_after["num_steps"] - stats_before["num_steps"]
    host_time = stats_after["host_time_s"] - stats_before["host_time_s"]
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": args.model,
        "dataset": args.dataset_name,
        "seed": args.seed,
        "n": args.n,
        "max_model_len": max_model_len,
        "enable_prefix_caching": llm.engine.config.enable_prefix_caching,
        "num_prompts": num_prompts,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "elapsed_s": elapsed,
        "output_tok_per_s": output_tokens / elapsed,
        "total_tok_per_s": (prompt_tokens + output_tokens) / elapsed,
        "steps": steps,
        "mean_step_ms": 1e3 * elapsed / max(steps, 1),
        "mean_host_ms_per_step": 1e3 * host_time / max(steps, 1),
        "preemptions": stats_after["num_preemptions"] - stats_before["num_preemptions"],
        "steps_by_kind": summarise(recorder.records),
        "compiles_during_run": jit.describe(),
        "gc_during_run": collections.describe(),
    }
    constrained = [o for o, p in zip(outputs, params) if p.structured_outputs is not None]
    if constrained:
        result["structured"] = {"requests": len(constrained),
                                "output_tokens": sum(len(c.token_ids) for o in constrained for c in o.outputs),
                                "ended_by_grammar": sum(o.finish_reason == "stop" for o in constrained)}
    if device == "cuda":  # the caching allocator's slow paths: cudaMalloc, and free-everything-and-retry (a sync)
        result["allocator_during_run"] = {k: allocator_after[k] - allocator_before[k] for k in allocator_after}
    if device == "cuda":
        ceilings: DeviceCeilings = measure_ceilings()
        floor_s = throughput_floor(llm, workload.prompts, [len(o.token_ids) for o in outputs], ceilings)
        result.update(
            copy_bandwidth_gb_s=ceilings.copy_bandwidth / 1e9,
            matmul_tflops=ceilings.matmul_flops / 1e12,
            floor_s=floor_s,
            floor_output_tok_per_s=output_tokens / floor_s,
            ratio_to_floor=floor_s / elapsed,
        )
    if peer is not None:
        result.update(peer)
        if "hf_output_tok_per_s" in peer:
            result["speedup_vs_hf"] = result["output_tok_per_s"] / peer["hf_output_tok_per_s"]
    _print(result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _allocator_counts(device: str) -> dict[str, int]:
    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_alloc_retries")}


def _peer_workload(args: argparse.Namespace, small: bool, model: str) -> Workload:
    """The workload, built before our engine exists (for the peer, which runs first): from the model's config."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model) if args.dataset_name == "sharegpt" else None
    limit = args.max_model_len or getattr(config, "max_position_embeddings", None) or 4096
    return build_workload(args, small, config.vocab_size, tokenizer, limit)


def _run_peer(model: str, workload: Workload, temperature: float, device: str) -> dict:
    """HF transformers on the same workload; a failed or short run is reported as such, never as a figure. (A
    CUDA error that poisons the process would still stop our own run after it.)"""
    try:
        peer = run_hf_continuous_batching(model, workload.prompts, workload.max_tokens, temperature, device)
    except Exception as exc:  # the peer's failure must not hide our own figures
        logger.error("the HF transformers peer failed: %s", exc)
        return {"hf_error": f"{type(exc).__name__}: {exc}"}
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"hf_output_tok_per_s": peer["output_tok_per_s"], "hf_output_tokens": peer["output_tokens"],
            "hf_elapsed_s": peer["elapsed_s"]}


@contextlib.contextmanager
def _maybe_profile(trace_dir: str | None, device: str) -> Iterator[None]:
    if trace_dir is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    os.makedirs(trace_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(trace_dir, "trace.json"))
    sort_key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def _print(result: dict) -> None:
    lines = [
        f"device            {result['device']}",
        f"model             {result['model']}  ({result['num_prompts']} prompts)",
        f"tokens            {result['prompt_tokens']} prompt, {result['output_tokens']} output (generated)",
        f"elapsed           {result['elapsed_s']:.2f} s over {result['steps']} steps "
        f"({result['mean_step_ms']:.2f} ms/step, host {result['mean_host_ms_per_step']:.2f} ms/step)",
        f"throughput        {result['output_tok_per_s']:,.0f} output tok/s, {result['total_tok_per_s']:,.0f} total tok/s",
        f"compiled in run   {result['compiles_during_run']}",
        *([f"structured        {result['structured']}"] if "structured" in result else []),
        f"gc in run         {result['gc_during_run']}",
    ]
    if "allocator_during_run" in result:
        counts = result["allocator_during_run"]
        lines.append(f"allocator in run  {counts['num_device_alloc']} cudaMalloc, {counts['num_alloc_retries']} "
                     f"retries (a retry frees the cache and waits for the device)")
    lines.append(format_summary(result["steps_by_kind"]))
    if "floor_s" in result:
        lines += [
            f"device ceilings   copy {result['copy_bandwidth_gb_s']:,.0f} GB/s, bf16 matmul "
            f"{result['matmul_tflops']:,.0f} TFLOP/s",
            f"floor             {result['floor_s']:.2f} s = {result['floor_output_tok_per_s']:,.0f} output tok/s; "
            f"we reach {100 * result['ratio_to_floor']:.1f}% of it",
        ]
    if "hf_error" in result:
        lines.append(f"HF transformers   failed: {result['hf_error']}")
    if "hf_output_tok_per_s" in result:
        lines.append(
            f"HF transformers   {result['hf_output_tok_per_s']:,.0f} output tok/s ({result['hf_output_tokens']} tokens, "
            f"{result['hf_elapsed_s']:.2f} s, continuous batching, paged sdpa); we are "
            f"{result['speedup_vs_hf']:.2f}x"
        )
    print("\n".join(lines))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parser.parse_args())


if __name__ == "__main__":
    cli()
