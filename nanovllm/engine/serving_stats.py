"""Numbers a serving front end reports: a snapshot of the engine core's state and front-end latency histograms.

``CoreStats`` is filled in the engine-core process and pickled to the front end (it is small, so it rides along
with step outputs). ``FrontendStats`` lives in the front end: it times tokens as they arrive there, which is what a
client sees (minus the network), and it is rendered as Prometheus histograms by the HTTP server.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

# Bucket bounds (seconds), close to vLLM's so that dashboards built for it read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


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
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    timestamp: float = 0.0  # time.time() when taken

    @property
    def kv_usage(self) -> float:
        return self.num_used_pages / self.num_kv_pages if self.num_kv_pages else 0.0


class Histogram:
    """A cumulative-bucket histogram in the Prometheus sense (``le`` bounds, plus +Inf)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for every bucket, ending with (inf, count)."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            out.append((bound, total))
        return out


@dataclass
class _Timing:
    arrival: float
    last_token: float | None = None


@dataclass
class FrontendStats:
    """Latency histograms over engine requests (one per sample of an ``n > 1`` request), timed in the front end."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    finished: Counter = field(default_factory=Counter)  # finish reason -> engine requests
    _live: dict[str, _Timing] = field(default_factory=dict, repr=False)

    def on_added(self, engine_request_id: str, now: float | None = None) -> None:
        self._live[engine_request_id] = _Timing(time.monotonic() if now is None else now)

    def on_outputs(self, outputs: Iterable[Any], now: float | None = None) -> None:
        """Fold in one step's ``EngineCoreOutput``s."""
        now = time.monotonic() if now is None else now
        for out in outputs:
            timing = self._live.get(out.request_id)
            if timing is None:
                continue
            if out.new_token_ids:
                if timing.last_token is None:
                    self.ttft.observe(now - timing.arrival)
                else:
                    self.inter_token.observe(now - timing.last_token)
                timing.last_token = now
            if out.finish_reason is not None:
                self._end(out.request_id, out.finish_reason, now)

    def on_removed(self, engine_request_id: str, reason: str = "abort") -> None:
        """A request left without a final output (aborted by the user, or failed)."""
        if engine_request_id in self._live:
            self._end(engine_request_id, reason, time.monotonic())

    def _end(self, engine_request_id: str, reason: str, now: float) -> None:
        timing = self._live.pop(engine_request_id)
        self.finished[reason] += 1
        if reason != "abort":
            self.e2e.observe(now - timing.arrival)
