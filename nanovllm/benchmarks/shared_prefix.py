"""``nanovllm bench prefix``: requests sharing a long system prompt, with the prefix cache on and off.

Default workload (GPU): 256 requests, a 1,000-token shared prefix, 100-token distinct suffixes, 64 output tokens
each, greedy, Qwen3-0.6B's shape with dummy weights. On CPU: 16 requests, a 200-token prefix, 20-token suffixes,
8 output tokens. Prints prefill tokens actually computed, the hit rate and throughput for both settings.
"""
from __future__ import annotations

import argparse
import gc
import logging
import random
import tempfile
import time

import torch
from transformers import AutoConfig

from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.testing import PRESETS, write_config_only

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-0.6b", help=f"checkpoint directory or preset {sorted(PRESETS)}")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--prefix-len", type=int, default=None)
    parser.add_argument("--suffix-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def run_once(model: str, load_format: str, prompts: list[list[int]], output_len: int, caching: bool,
             args: argparse.Namespace) -> dict:
    logger.info("prefix cache %s: loading %s, then %d requests", "on" if caching else "off", args.model, len(prompts))
    llm = LLM(model, load_format=load_format, device=args.device, dtype=args.dtype,
              enforce_eager=args.enforce_eager, enable_prefix_caching=caching,
              max_model_len=max(len(p) for p in prompts) + output_len + 16)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    before = llm.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start
    after = llm.stats()
    queried = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    result = {
        "prefix_caching": caching,
        "elapsed_s": elapsed,
        "prompt_tokens": sum(len(p) for p in prompts),
        "prefill_tokens_computed": after["num_prompt_tokens"] - before["num_prompt_tokens"],
        "hit_rate": hits / queried if queried else 0.0,
        "output_tokens": sum(len(o.token_ids) for o in outputs),
        "cached_tokens_reported": sum(o.num_cached_tokens for o in outputs),
    }
    result["total_tok_per_s"] = (result["prompt_tokens"] + result["output_tokens"]) / elapsed
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(args: argparse.Namespace) -> list[dict]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    small = device == "cpu"
    num_prompts = args.num_prompts or (16 if small else 256)
    prefix_len = args.prefix_len or (200 if small else 1000)
    suffix_len = args.suffix_len or (20 if small else 100)
    output_len = args.output_len or (8 if small else 64)
    model, load_format = args.model, "auto"
    if model in PRESETS:
        model, load_format = write_config_only(tempfile.mkdtemp(prefix="nanovllm-bench-"), model), "dummy"
    top_id = min(10000, AutoConfig.from_pretrained(model).vocab_size - 1)
    random.seed(0)
    prefix = [random.randint(0, top_id) for _ in range(prefix_len)]
    prompts = [prefix + [random.randint(0, top_id) for _ in range(suffix_len)] for _ in range(num_prompts)]

    results = [run_once(model, load_format, prompts, output_len, caching, args) for caching in (False, True)]
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, model {args.model}: "
          f"{num_prompts} requests, {prefix_len}-token shared prefix + {suffix_len}-token suffixes, "
          f"{output_len} output tokens each")
    print(f"{'prefix cache':>12} {'prefill computed':>17} {'hit rate':>9} {'elapsed s':>10} {'total tok/s':>12}")
    for r in results:
        print(f"{'on' if r['prefix_caching'] else 'off':>12} {r['prefill_tokens_computed']:>17,} "
              f"{100 * r['hit_rate']:>8.1f}% {r['elapsed_s']:>10.2f} {r['total_tok_per_s']:>12,.0f}")
    off, on = results
    shared = (num_prompts - 1) * prefix_len / off["prompt_tokens"]
    print(f"prefill computed drops by {100 * (1 - on['prefill_tokens_computed'] / off['prefill_tokens_computed']):.1f}% "
          f"(shared fraction of the prompt tokens: {100 * shared:.1f}%); speed-up {off['elapsed_s'] / on['elapsed_s']:.2f}x")
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    main(parser.parse_args())


if __name__ == "__main__":
    cli()
