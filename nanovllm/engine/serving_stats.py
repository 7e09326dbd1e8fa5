"""Numbers a serving front end reports: a snapshot of the engine core's state, and per-request timings.

``CoreStats`` is filled in the engine-core process and pickled to the front end (it is small, so it rides along
with step outputs). ``FrontendStats`` lives in the front end: it follows each engine request from arrival to its end
and, for every batch of core outputs, hands an ``IterationStats`` to its observers (the HTTP server's Prometheus
metrics are one). No Prometheus here: the engine does not depend on the server's libraries.

Intervals are only ever taken between two timestamps of one process (as in vLLM): time to first token and
end-to-end latency on the front end's clock (from ``EngineRequest.arrival_time``), and queue, prefill, decode,
inference and inter-token times on the core's clock (``RequestTimings`` and ``CoreOutputs.timestamp``).
"""
from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

if TYPE_CHECKING:
    from nanovllm.engine.messages import EngineCoreOutput, EngineRequest

logger = logging.getLogger(__name__)

# Tokens per engine step: vLLM's bounds for vllm:iteration_tokens_total.
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Histogram:
    """Observations counted per bucket (upper bounds, plus one for everything above): what the core keeps of its
    per-step token counts, at the cost of one bisect per step."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


@dataclass
class CoreStats:
    """The engine core's state at one moment (counters are totals since start)."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_pages: int = 0
    num_used_pages: int = 0  # pages held by requests; idle prefix-cache pages count as free, as in vLLM
    num_cached_pages: int = 0  # pages the prefix cache holds (some may also be in use)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens served from it
    num_prompt_tokens: int = 0  # prompt tokens computed (cache hits excluded, recomputation after preemption in)
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    # tokens each step computed, per bucket of ITERATION_TOKENS_BUCKETS (not cumulative; the last is +Inf)
    iteration_tokens_counts: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    timestamp: float = 0.0  # time.time() when taken

    @property
    def kv_usage(self) -> float:
        return self.num_used_pages / self.num_kv_pages if self.num_kv_pages else 0.0


@dataclass(frozen=True)
class RequestTimings:
    """When the core queued a request and first scheduled it (``time.monotonic()`` of the core process); sent with
    the request's first output."""

    queued: float
    scheduled: float


@dataclass(frozen=True)
class FinishedRequestStats:
    """One engine request (one sample of an ``n > 1`` request) that ended, for whatever reason."""

    finish_reason: str  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens: int  # the request's max_tokens, resolved (what limited it)
    e2e_latency: float  # arrival to the end, on the front end's clock
    # the core's intervals, known once the request was scheduled and sent a token (None otherwise): queue (queued to
    # first scheduled), prefill (scheduled to first token), decode (first to last token), inference (scheduled to
    # last token); preemptions fall inside them, as in vLLM
    queued_time: float | None = None
    prefill_time: float | None = None
    decode_time: float | None = None
    inference_time: float | None = None
    mean_time_per_output_token: float | None = None  # decode time / (tokens - 1), with two tokens or more


@dataclass
class IterationStats:
    """What one batch of core outputs (or one request's end in the front end) added."""

    num_prompt_tokens: int = 0  # whole prompts (prefix-cache hits included) of requests that got their first token
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    n_params: list[int] = field(default_factory=list)  # per user request that ended: its n
    max_num_generation_tokens: list[int] = field(default_factory=list)  # and the longest output of its samples

    @property
    def is_empty(self) -> bool:
        return not (self.num_generation_tokens or self.time_to_first_tokens or self.finished_requests
                    or self.n_params)


class StatsObserver(Protocol):
    def record(self, stats: IterationStats) -> None: ...


@dataclass
class _UserRequest:
    n: int
    remaining: int
    max_generated: int = 0


@dataclass
class _Live:
    """One engine request on its way."""

    parent: _UserRequest
    arrival: float  # front end's clock
    num_prompt_tokens: int
    max_tokens: int
    timings: RequestTimings | None = None  # core's clock
    first_token: float | None = None  # core's clock, from CoreOutputs.timestamp
    last_token: float | None = None
    num_generated: int = 0


class FrontendStats:
    """Per-request bookkeeping in the front end; calls happen under the owner's lock (``AsyncLLM``)."""

    def __init__(self) -> None:
        self.finished: Counter[str] = Counter()  # finish reason -> engine requests
        self.observers: list[StatsObserver] = []
        self._live: dict[str, _Live] = {}

    def add_observer(self, observer: StatsObserver) -> None:
        self.observers.append(observer)

    def on_added(self, specs: Sequence["EngineRequest"]) -> None:
        """The engine requests (samples) of one user request were queued."""
        parent = _UserRequest(n=len(specs), remaining=len(specs))
        for spec in specs:
            self._live[spec.request_id] = _Live(parent, spec.arrival_time, len(spec.prompt_token_ids), spec.max_tokens)

    def on_outputs(self, outputs: Iterable["EngineCoreOutput"], core_timestamp: float,
                   now: float | None = None) -> None:
        """Fold in one step's outputs; ``core_timestamp`` is when the core made them (its clock)."""
        now = time.monotonic() if now is None else now
        stats = IterationStats()
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if out.timings is not None:
                live.timings = out.timings
            if out.new_token_ids:
                num_new = len(out.new_token_ids)
                stats.num_generation_tokens += num_new
                live.num_generated += num_new
                if live.first_token is None:
                    live.first_token = core_timestamp
                    stats.time_to_first_tokens.append(now - live.arrival)
                    stats.num_prompt_tokens += live.num_prompt_tokens
                else:
                    stats.inter_token_latencies.append(core_timestamp - live.last_token)  # type: ignore[operator]
                live.last_token = core_timestamp
            if out.finish_reason is not None:
                self._end(out.request_id, out.finish_reason, now, stats)
        self._notify(stats)

    def on_removed(self, engine_request_id: str, reason: str = "abort", now: float | None = None) -> None:
        """A request ended in the front end (a stop string found there, an abort, or a failure)."""
        if engine_request_id in self._live:
            stats = IterationStats()
            self._end(engine_request_id, reason, time.monotonic() if now is None else now, stats)
            self._notify(stats)

    def _end(self, engine_request_id: str, reason: str, now: float, stats: IterationStats) -> None:
        live = self._live.pop(engine_request_id)
        self.finished[reason] += 1
        stats.finished_requests.append(_finished(live, reason, now))
        parent = live.parent
        parent.remaining -= 1
        parent.max_generated = max(parent.max_generated, live.num_generated)
        if parent.remaining == 0:
            stats.n_params.append(parent.n)
            stats.max_num_generation_tokens.append(parent.max_generated)

    def _notify(self, stats: IterationStats) -> None:
        if stats.is_empty:
            return
        for observer in self.observers:
            try:
                observer.record(stats)
            except Exception:  # noqa: BLE001 - a broken observer must not stop output processing
                logger.exception("stats observer %r failed", observer)


def _finished(live: _Live, reason: str, now: float) -> FinishedRequestStats:
    queued = prefill = decode = inference = per_token = None
    if live.timings is not None and live.first_token is not None and live.last_token is not None:
        scheduled = live.timings.scheduled
        queued, prefill = scheduled - live.timings.queued, live.first_token - scheduled
        decode, inference = live.last_token - live.first_token, live.last_token - scheduled
        per_token = decode / (live.num_generated - 1) if live.num_generated > 1 else None
    return FinishedRequestStats(reason, live.num_prompt_tokens, live.num_generated, live.max_tokens,
                                now - live.arrival, queued, prefill, decode, inference, per_token)
