"""The host's grammar work per decode step, without a model: what structured outputs add to each step.

``--rows`` matchers follow ``BENCH_SCHEMA`` (bench throughput's schema). Each step fills their bitmask, then each
takes a token drawn uniformly from what its row allows (what a random model does under the mask), as the engine
does it (``StructuredOutputManager.bitmask`` and ``accept``). Prints the mean time per step of each part.

    python -m nanovllm.benchmarks.grammar_step --tokenizer DIR --vocab-size 151936 --rows 128

``--vocab-size`` is the model's head (it may be padded past the tokenizer, as bench throughput pairs Qwen3's shape
with any tokenizer).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from nanovllm.benchmarks.throughput import BENCH_SCHEMA
    from nanovllm.engine.structured_output import StructuredOutputManager
    from nanovllm.sampling_params import StructuredOutputsParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory or hub id")
    parser.add_argument("--vocab-size", type=int, default=None, help="the model's head (default: the tokenizer's)")
    parser.add_argument("--rows", type=int, default=128, help="constrained rows per step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default="xgrammar", choices=["xgrammar", "llguidance"])
    parser.add_argument("--batch-threads", type=int, default=None,
                        help="xgrammar's native threads for a step's rows (default: the engine's)")
    args = parser.parse_args(argv)
    if args.batch_threads is not None:
        from nanovllm.engine.structured_output import xgrammar_backend

        xgrammar_backend.BATCH_THREADS = args.batch_threads

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = args.vocab_size or len(tokenizer)
    manager = StructuredOutputManager(args.backend, vocab_size, lambda: tokenizer)
    spec = StructuredOutputsParams(json=BENCH_SCHEMA)
    states = [manager.start(spec, frozenset([tokenizer.eos_token_id])) for _ in range(args.rows)]
    for state in states:
        state.compiled.exception(timeout=300)
        manager.poll(state)
    matchers = [state.matcher for state in states]
    rng = np.random.default_rng(0)
    fill_s = accept_s = 0.0
    steps = tokens = 0
    for _ in range(args.steps):
        live = [m for m in matchers if not m.is_terminated()]
        if not live:
            break
        start = time.perf_counter()
        mask = manager.bitmask(live)
        filled = time.perf_counter()
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :len(tokenizer)]
        chosen = [int(rng.choice(np.flatnonzero(row))) for row in bits]
        before_accept = time.perf_counter()
        if not all(manager.accept(live, chosen)):
            raise RuntimeError("a matcher refused a token its own bitmask allowed")
        accept_s += time.perf_counter() - before_accept
        fill_s += filled - start
        steps += 1
        tokens += len(live)
    manager.shutdown()
    result = {"rows": args.rows, "steps": steps, "tokens": tokens, "fill_ms_per_step": 1e3 * fill_s / steps,
              "accept_ms_per_step": 1e3 * accept_s / steps, "accept_us_per_token": 1e6 * accept_s / tokens}
    threads = f" (batch threads {args.batch_threads})" if args.batch_threads is not None else ""
    print(f"{args.backend}{threads}, {args.rows} rows, head of {vocab_size:,} ids, tokenizer of {len(tokenizer):,}: "
          f"{steps} steps, {tokens:,} tokens; per step: bitmask {result['fill_ms_per_step']:.2f} ms, accept "
          f"{result['accept_ms_per_step']:.2f} ms ({result['accept_us_per_token']:.1f} us a token)")
    return result


if __name__ == "__main__":
    main()
