"""``nanovllm bench serve``: latency and throughput of any OpenAI-compatible server, as a client sees them.

Flags as vLLM's ``vllm bench serve`` (``serve_args.py``). Datasets: ``random`` (lengths around a mean),
``sharegpt`` (a local ShareGPT JSON file), ``prefix_repetition`` (groups of requests sharing a long prefix: what a
prefix cache is for) and ``incast`` (short streaming requests running while a burst of long prompts arrives at once:
what chunked prefill is for; run it against a server started with a small and a large ``--max-num-batched-tokens``
to compare). Arrivals are Poisson at ``--request-rate`` (or all at once), capped by ``--max-concurrency``. Reports
TTFT, TPOT, ITL and end-to-end latency (mean, median, percentiles), throughput and goodput.

It tells the truth: before sending anything it asks the server for the model's context and vocabulary
(``serve_server.py``), so that prompts hold no out-of-vocabulary id and prompt plus output fit ``max_model_len``;
it shows a progress bar; and it exits with status 1, naming the first error, when any request failed.
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
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from nanovllm.benchmarks import serve_args, sharegpt
from nanovllm.benchmarks.lengths import Length, fit_lengths
from nanovllm.benchmarks.serve_args import LENGTH_DEFAULTS
from nanovllm.benchmarks.serve_client import BenchRequest, RequestResult, send_request
from nanovllm.benchmarks.serve_datasets import (
    COMMON_WORDS,
    IncastPlan,
    PromptMaker,
    incast_plan,
    prefix_repetition_requests,
    random_requests,
    sharegpt_requests,
)
from nanovllm.benchmarks.serve_metrics import detailed, parse_slos, plot_latencies, print_summary, summarize
from nanovllm.benchmarks.serve_server import (
    ServerError,
    ServerInfo,
    chat_template_tokens,
    discover,
    server_token_counter,
)

logger = logging.getLogger(__name__)

add_arguments = serve_args.add_arguments

TOKENS_PER_WORD_GUESS = 1.5  # common words without a way to count them: a guess on the long side (shorter prompts)
TEXT_SLACK = 0.9  # text prompts are tokenized by the server: keep this share of the context for them
CHAT_OVERHEAD_GUESS = 64  # tokens a chat template adds, when the server cannot say


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; exits with status 1 (and one line) when the server cannot be used or a request failed."""
    try:
        report, results = _main(args)
    except ServerError as exc:
        logger.debug("bench serve failed", exc_info=True)
        sys.exit(f"error: {exc}")
    failed = [r for r in results if not r.success]
    if failed:
        hint = " (give the server's API key with --api-key or $OPENAI_API_KEY)" if " 401" in failed[0].error else ""
        sys.exit(f"error: {len(failed)} of {len(results)} requests failed; the first: {failed[0].error}{hint}")
    return report


def _main(args: argparse.Namespace) -> tuple[dict[str, Any], list[RequestResult]]:
    serve_args.check(args)
    slos = parse_slos(args.goodput)
    percentiles = [float(p) for p in str(args.percentiles).split(",") if p]
    root, url = serve_args.urls(args)
    info = discover(root, args.api_key, args.model, timeout_s=min(args.request_timeout, 60.0))
    batch, plan, source = _requests(args, info, root)
    print(f"bench serve: {args.dataset_name} against {url} (model {info.model}, max_model_len "
          f"{info.max_model_len})")

    async def send_all(session: Any) -> tuple[list[RequestResult], float, tuple[float, float] | None]:
        async def send(req: BenchRequest) -> RequestResult:
            return await send_request(session, url, args.backend, info.model, req, args.api_key, args.ignore_eos,
                                      args.request_timeout)

        start = time.perf_counter()
        if plan is not None:
            results, window = await _run_incast(plan, send, args.disable_tqdm)
        else:
            results = await _run_arrivals(batch, send, args.request_rate, args.burstiness, args.max_concurrency,
                                          args.seed, args.disable_tqdm)
            window = None
        return results, time.perf_counter() - start, window

    results, duration, burst_window = asyncio.run(_with_session(send_all))
    report: dict[str, Any] = {"base_url": root, "endpoint": url, "backend": args.backend, "model": info.model,
                              "max_model_len": info.max_model_len, "dataset": args.dataset_name,
                              "prompts_from": source, "request_rate": args.request_rate,
                              "max_concurrency": args.max_concurrency}
    if args.save_detailed:
        report["requests"] = detailed(results)
    if burst_window is None:
        report["summary"] = summarize(results, duration, percentiles, slos)
        print_summary("Serving benchmark result", report["summary"])
    else:
        report.update(_incast_report(results, burst_window, percentiles, slos))
    _save(args, report, results, info.model)
    return report, results


async def _with_session(body: Callable[[Any], Any]) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # the benchmark, not the client pool, decides concurrency
    async with aiohttp.ClientSession(connector=connector) as session:
        return await body(session)


def _save(args: argparse.Namespace, report: dict[str, Any], results: list[RequestResult], model: str) -> None:
    path = serve_args.result_path(args, model)
    if path:
        with open(path, "w") as f:
            json.dump({**report, "args": {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}}, f,
                      indent=2, default=str)
        logger.info("results written to %s", path)
    plot_path = args.plot or (os.path.splitext(path)[0] + ".png" if path else None)
    if plot_path:
        plot_latencies(results, plot_path, f"{args.dataset_name} @ {args.base_url or args.host}")


# ---- prompts ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """The tokens a request may hold (prompt and output), and how that was worked out, for messages."""

    tokens: int | None  # None: the server does not say
    about: str = "max_model_len"

    def less(self, tokens: int, why: str) -> "Budget":
        return self if self.tokens is None else Budget(self.tokens - tokens, f"{self.about}, less {tokens} {why}")

    def share(self, fraction: float, why: str) -> "Budget":
        if self.tokens is None:
            return self
        return Budget(math.floor(self.tokens * fraction), f"{self.about}, {fraction:.0%} of it {why}")


def _requests(args: argparse.Namespace, info: ServerInfo, root: str
              ) -> tuple[list[BenchRequest], IncastPlan | None, str]:
    """The dataset's requests (or the incast plan), fitted to the server's context, and where the prompts come
    from."""
    tokenizer = _load_tokenizer(args.tokenizer)
    counter = _token_counter(tokenizer, root, args.api_key, info.model)
    budget = Budget(info.max_model_len, f"max_model_len {info.max_model_len}")
    if info.max_model_len is not None and args.backend == "openai-chat":
        overhead = chat_template_tokens(root, args.api_key, info.model, 60.0)
        if overhead is None:
            logger.warning("the server cannot count its chat template's tokens: keeping %d for them",
                           CHAT_OVERHEAD_GUESS)
        budget = budget.less(CHAT_OVERHEAD_GUESS if overhead is None else overhead, "for the chat template")
    if args.dataset_name == "sharegpt":
        return _sharegpt(args, counter, budget), None, f"ShareGPT file {args.dataset_path}"
    maker, source = _prompt_maker(args, info, tokenizer, counter)
    logger.info("prompts: %s", source)
    if not maker.exact:
        budget = budget.share(TEXT_SLACK, "for text the server tokenizes")
    if args.dataset_name == "incast":
        return [], _incast(args, maker, budget), source
    if args.dataset_name == "random":
        return _random(args, maker, budget), None, source
    return _prefix_repetition(args, maker, budget), None, source


def _load_tokenizer(path: str | None) -> Any:
    if not path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer {path!r} cannot be loaded: {exc}") from exc


def _token_counter(tokenizer: Any, root: str, api_key: str | None, model: str
                   ) -> Callable[[list[str]], list[int | None]] | None:
    """Counts tokens of texts: the local tokenizer, else the server's /tokenize, else None."""
    if tokenizer is not None:
        return lambda texts: [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return server_token_counter(root, api_key, model, 60.0)


def _prompt_maker(args: argparse.Namespace, info: ServerInfo, tokenizer: Any,
                  counter: Callable[[list[str]], list[int | None]] | None) -> tuple[PromptMaker, str]:
    """The best source of random prompts at hand, and what it is (see serve_datasets.py)."""
    as_text = args.backend == "openai-chat" or args.prompt_format == "text"
    vocab = args.vocab_size or info.vocab_size
    if tokenizer is not None:
        return (PromptMaker.from_tokenizer(tokenizer, args.seed, as_text, below=vocab),
                f"{'text of ' if as_text else ''}token ids from the vocabulary of {args.tokenizer}")
    if vocab and not as_text:
        if args.vocab_size:
            return PromptMaker.from_ids(vocab, args.seed), f"token ids below --vocab-size {vocab}"
        return (PromptMaker.from_ids(vocab, args.seed, info.special_ids),
                f"token ids below {vocab} (the server's /tokenizer_info), special tokens left out")
    if args.prompt_format == "ids":
        raise ValueError("--prompt-format ids needs the vocabulary: --tokenizer DIR, --vocab-size N, or a server that "
                         "answers /tokenizer_info")
    if counter is None:
        logger.warning("no tokenizer, no /tokenizer_info and no /tokenize: prompts of common words at a guessed %.1f "
                       "tokens a word (the prompt lengths reported are the server's)", TOKENS_PER_WORD_GUESS)
        return PromptMaker.from_words(args.seed, TOKENS_PER_WORD_GUESS), "common English words"
    tokens_per_word = _tokens_per_word(counter, info.max_model_len, args.seed)
    return (PromptMaker.from_words(args.seed, tokens_per_word),
            f"common English words ({tokens_per_word:.2f} tokens a word, counted by the server)")


def _tokens_per_word(counter: Callable[[list[str]], list[int | None]], max_model_len: int | None,
                     seed: int) -> float:
    """Tokens a common word costs, counted on 256 random words in pieces short enough for the server to count."""
    rng = random.Random(seed)
    words = [rng.choice(COMMON_WORDS) for _ in range(256)]
    step = max(1, min(len(words), (max_model_len or 1024) // 8))
    pieces = [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
    counts = counter(pieces)
    if any(c is None for c in counts):
        logger.warning("the server did not count every calibration text: assuming %.1f tokens a word",
                       TOKENS_PER_WORD_GUESS)
        return TOKENS_PER_WORD_GUESS
    return max(sum(counts), 1) / len(words)  # type: ignore[arg-type]


def _given(args: argparse.Namespace, name: str, general: str | None = None) -> Length:
    """The length flag ``name`` as given (else the general ``--input-len``/``--output-len``), with its default."""
    if getattr(args, name) is None and general is not None and getattr(args, general) is not None:
        name, default = general, LENGTH_DEFAULTS[name]
    else:
        default = LENGTH_DEFAULTS[name]
    return Length("--" + name.replace("_", "-"), getattr(args, name), default)


def _random(args: argparse.Namespace, maker: PromptMaker, budget: Budget) -> list[BenchRequest]:
    input_len, output_len = fit_lengths(
        [_given(args, "random_input_len", "input_len"), _given(args, "random_output_len", "output_len")],
        budget.tokens, stretch=1 + args.random_range_ratio, limit_name=budget.about)
    return random_requests(maker, args.num_prompts, input_len, output_len, args.random_range_ratio)


def _prefix_repetition(args: argparse.Namespace, maker: PromptMaker, budget: Budget) -> list[BenchRequest]:
    output = _given(args, "prefix_repetition_output_len", "output_len")
    if output.value is None and args.random_output_len is not None:
        output = Length("--random-output-len", args.random_output_len, output.default)
    prefix_len, suffix_len, output_len = fit_lengths(
        [_given(args, "prefix_repetition_prefix_len"), _given(args, "prefix_repetition_suffix_len"), output],
        budget.tokens, limit_name=budget.about)
    return prefix_repetition_requests(maker, args.num_prompts, args.prefix_repetition_num_prefixes, prefix_len,
                                      suffix_len, output_len)


def _incast(args: argparse.Namespace, maker: PromptMaker, budget: Budget) -> IncastPlan:
    background = fit_lengths([_given(args, "incast_background_input_len"),
                              _given(args, "incast_background_output_len")], budget.tokens, limit_name=budget.about)
    burst = fit_lengths([_given(args, "incast_burst_input_len"), _given(args, "incast_burst_output_len")],
                        budget.tokens, limit_name=budget.about)
    return incast_plan(maker, args.incast_background, *background, args.incast_burst, *burst, args.incast_warmup,
                       args.incast_cooldown)


def _sharegpt(args: argparse.Namespace, counter: Callable[[list[str]], list[int | None]] | None,
              budget: Budget) -> list[BenchRequest]:
    conversations = sharegpt.load_conversations(args.dataset_path, args.seed)
    if counter is None:
        raise ValueError("--dataset-name sharegpt counts tokens with --tokenizer DIR or the server's /tokenize; "
                         "this server has no /tokenize")
    output_len = args.sharegpt_output_len or args.output_len
    samples = sharegpt.sample(conversations, args.num_prompts, counter, budget.tokens, output_len, args.seed)
    return sharegpt_requests(samples)


# ---- arrivals -----------------------------------------------------------------------------------------------------

async def _run_arrivals(requests: list[BenchRequest], send: Any, rate: float, burstiness: float,
                        max_concurrency: int | None, seed: int, disable_tqdm: bool) -> list[RequestResult]:
    """Send ``requests`` with gamma-distributed gaps (Poisson for burstiness 1) under a concurrency cap."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=disable_tqdm, dynamic_ncols=True)

    async def one(req: BenchRequest) -> RequestResult:
        async with limit:
            result = await send(req)
        bar.update(1)
        return result

    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(req)))
        if math.isfinite(rate) and rate > 0:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        bar.close()


async def _run_incast(plan: IncastPlan, send: Any, disable_tqdm: bool
                      ) -> tuple[list[RequestResult], tuple[float, float]]:
    """Background clients loop over short requests; the burst goes out at once after the warm-up."""
    results: list[RequestResult] = []
    stop = asyncio.Event()
    bar = tqdm(desc="requests (background and burst)", unit="req", disable=disable_tqdm, dynamic_ncols=True)

    async def counted(req: BenchRequest) -> RequestResult:
        result = await send(req)
        bar.update(1)
        return result

    async def background_client(index: int) -> None:
        i = index
        while not stop.is_set():
            results.append(await counted(plan.background[i % len(plan.background)]))
            i += plan.background_clients

    try:
        clients = [asyncio.create_task(background_client(i)) for i in range(plan.background_clients)]
        await asyncio.sleep(plan.warmup_s)
        burst_start = time.perf_counter()
        burst = await asyncio.gather(*(counted(req) for req in plan.burst))
        burst_end = time.perf_counter()
        await asyncio.sleep(plan.cooldown_s)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        bar.close()
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
