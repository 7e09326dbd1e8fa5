"""``nanovllm bench serve``: latency and throughput of any OpenAI-compatible server, as a client sees them.

Datasets: ``random`` (input/output lengths around a mean), ``shared-prefix`` (groups of requests sharing a long
prefix: what a prefix cache is for) and ``incast`` (short streaming requests running while a burst of long prompts
arrives at once: what chunked prefill is for; run it against a server started with a small and a large
``--max-num-batched-tokens`` to compare). Arrivals are Poisson at ``--request-rate`` (or all at once), capped by
``--max-concurrency``. Reports TTFT, TPOT, ITL and end-to-end latency (mean, median, p99), throughput and goodput.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any

from nanovllm.benchmarks.serve_client import BenchRequest, RequestResult, fetch_model_name, send_completion
from nanovllm.benchmarks.serve_datasets import (
    IncastPlan,
    PromptMaker,
    incast_plan,
    random_requests,
    shared_prefix_requests,
)
from nanovllm.benchmarks.serve_metrics import parse_slos, plot_latencies, print_summary, summarize

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer for drawing prompt tokens (default: random ids below --vocab-size)")
    parser.add_argument("--vocab-size", type=int, default=10000, help="id range of prompts without --tokenizer")
    parser.add_argument("--prompt-format", choices=["ids", "text"], default="ids")
    parser.add_argument("--dataset", choices=["random", "shared-prefix", "incast"], default="random")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1 +- r)")
    parser.add_argument("--shared-prefix-groups", type=int, default=8)
    parser.add_argument("--shared-prefix-len", type=int, default=1024)
    parser.add_argument("--shared-suffix-len", type=int, default=64)
    parser.add_argument("--incast-background", type=int, default=8, help="concurrent short streaming clients")
    parser.add_argument("--incast-background-input-len", type=int, default=32)
    parser.add_argument("--incast-background-output-len", type=int, default=20)
    parser.add_argument("--incast-burst", type=int, default=16, help="long prompts arriving at once")
    parser.add_argument("--incast-burst-input-len", type=int, default=1000)
    parser.add_argument("--incast-burst-output-len", type=int, default=16)
    parser.add_argument("--incast-warmup", type=float, default=3.0, help="seconds of background before the burst")
    parser.add_argument("--incast-cooldown", type=float, default=2.0, help="seconds of background after it")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: all at once")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps (1: Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    parser.add_argument("--percentiles", default="99", help="comma-separated, besides mean and median")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-result", default=None, metavar="PATH.json")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="default: next to --save-result")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    slos = parse_slos(args.goodput)
    percentiles = [float(p) for p in str(args.percentiles).split(",") if p]
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    maker = PromptMaker(tokenizer, args.vocab_size, args.prompt_format, args.seed)
    base_url = args.base_url.rstrip("/")
    url = f"{base_url}/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)  # the benchmark, not the client pool, decides concurrency
    async with aiohttp.ClientSession(connector=connector) as session:
        model = args.model or await fetch_model_name(session, base_url, args.api_key)

        async def send(req: BenchRequest) -> RequestResult:
            return await send_completion(session, url, model, req, args.api_key, args.ignore_eos, args.request_timeout)

        print(f"bench serve: {args.dataset} against {base_url} (model {model})")
        start = time.perf_counter()
        if args.dataset == "incast":
            plan = incast_plan(maker, args.incast_background, args.incast_background_input_len,
                               args.incast_background_output_len, args.incast_burst, args.incast_burst_input_len,
                               args.incast_burst_output_len, args.incast_warmup, args.incast_cooldown)
            results, burst_window = await _run_incast(plan, send)
        else:
            if args.dataset == "random":
                requests = random_requests(maker, args.num_prompts, args.random_input_len, args.random_output_len,
                                           args.random_range_ratio)
            else:
                requests = shared_prefix_requests(maker, args.num_prompts, args.shared_prefix_groups,
                                                  args.shared_prefix_len, args.shared_suffix_len,
                                                  args.random_output_len)
            results = await _run_arrivals(requests, send, args.request_rate, args.burstiness, args.max_concurrency,
                                          args.seed)
            burst_window = None
        duration = time.perf_counter() - start

    report: dict[str, Any] = {"base_url": base_url, "model": model, "dataset": args.dataset,
                              "request_rate": args.request_rate, "max_concurrency": args.max_concurrency}
    if burst_window is None:
        report["summary"] = summarize(results, duration, percentiles, slos)
        print_summary("Serving benchmark result", report["summary"])
    else:
        report.update(_incast_report(results, burst_window, percentiles, slos))
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({**report, "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=2,
                      default=str)
        logger.info("results written to %s", args.save_result)
    plot_path = args.plot or (os.path.splitext(args.save_result)[0] + ".png" if args.save_result else None)
    if plot_path:
        plot_latencies(results, plot_path, f"{args.dataset} @ {base_url}")
    return report


async def _run_arrivals(requests: list[BenchRequest], send: Any, rate: float, burstiness: float,
                        max_concurrency: int | None, seed: int) -> list[RequestResult]:
    """Send ``requests`` with gamma-distributed gaps (Poisson for burstiness 1) under a concurrency cap."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

    async def one(req: BenchRequest) -> RequestResult:
        async with limit:
            return await send(req)

    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(req)))
        if math.isfinite(rate) and rate > 0:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))
    return list(await asyncio.gather(*tasks))


async def _run_incast(plan: IncastPlan, send: Any) -> tuple[list[RequestResult], tuple[float, float]]:
    """Background clients loop over short requests; the burst goes out at once after the warm-up."""
    results: list[RequestResult] = []
    stop = asyncio.Event()

    async def background_client(index: int) -> None:
        i = index
        while not stop.is_set():
            results.append(await send(plan.background[i % len(plan.background)]))
            i += plan.background_clients

    clients = [asyncio.create_task(background_client(i)) for i in range(plan.background_clients)]
    await asyncio.sleep(plan.warmup_s)
    burst_start = time.perf_counter()
    burst = await asyncio.gather(*(send(req) for req in plan.burst))
    burst_end = time.perf_counter()
    await asyncio.sleep(plan.cooldown_s)
    stop.set()
    await asyncio.gather(*clients)
    return results + list(burst), (burst_start, burst_end)


def _incast_report(results: list[RequestResult], window: tuple[float, float], percentiles: list[float],
                   slos: dict[str, float]) -> dict[str, Any]:
    """Short requests that overlapped the burst, against those that ran before it, plus the burst itself."""
    start, end = window
    background = [r for r in results if r.kind == "background" and r.success]
    during = [r for r in background if r.start < end and r.start + r.latency > start]
    before = [r for r in background if r.start + r.latency <= start]
    burst = [r for r in results if r.kind == "burst"]
    report: dict[str, Any] = {"burst_window_s": end - start}
    for name, group in (("background_before_burst", before), ("background_during_burst", during)):
        summary = summarize(group, end - start, percentiles, slos)
        summary["worst_inter_token_gap_ms"] = 1000 * max((r.max_gap for r in group), default=0.0)
        summary["worst_ttft_ms"] = 1000 * max((r.ttft for r in group), default=0.0)
        report[name] = summary
    report["burst"] = summarize(burst, end - start, percentiles, slos)
    for name in ("background_before_burst", "background_during_burst"):
        s = report[name]
        print(f"{name}: {s['completed']} requests, TTFT mean {s['ttft']['mean_ms']:.1f} ms / "
              f"p99 {s['ttft'].get('p99_ms', 0.0):.1f} ms / worst {s['worst_ttft_ms']:.1f} ms; "
              f"worst inter-token gap {s['worst_inter_token_gap_ms']:.1f} ms")
    b = report["burst"]
    print(f"burst: {b['completed']} long prompts in {end - start:.2f} s, TTFT mean {b['ttft']['mean_ms']:.1f} ms")
    return report
