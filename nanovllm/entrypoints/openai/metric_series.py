"""The engine's Prometheus series: vLLM's names, types, labels, buckets and meanings, under ``nanovllm:``.

Two sources feed them:
- ``RequestMetrics`` (counters and histograms of requests) is a ``StatsObserver`` of the front end's
  ``FrontendStats``: it observes each batch of outputs as it is processed.
- ``CoreCollector`` reads the engine core's latest ``CoreStats`` snapshot at scrape time (gauges, the core's own
  counters, and its per-step token histogram, which the core counts in buckets itself).

``VLLM_NAMES`` maps each series to its names in vLLM, where vLLM has a series with the same meaning (see
``metrics.py`` for the rule that exports them under ``vllm:`` too).
"""
from __future__ import annotations

from itertools import accumulate
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nanovllm.config import EngineConfig
from nanovllm.engine.serving_stats import ITERATION_TOKENS_BUCKETS, CoreStats, IterationStats

PREFIX = "nanovllm:"
LABELS = ["model_name"]
FINISH_REASONS = ("stop", "length", "abort", "error")

# our name (without prefix) -> vLLM's names for it; the second names are vLLM's deprecated spellings, which the
# dashboard vLLM ships still queries
VLLM_NAMES: dict[str, tuple[str, ...]] = {name: (name,) for name in (
    "num_requests_running", "num_requests_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
    "iteration_tokens_total", "prompt_tokens", "generation_tokens", "request_success", "time_to_first_token_seconds",
    "request_time_per_output_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
    "request_inference_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
    "request_prompt_tokens", "request_generation_tokens", "request_max_num_generation_tokens", "request_params_n",
    "request_params_max_tokens", "cache_config_info",
)}
VLLM_NAMES["kv_cache_usage_perc"] = ("kv_cache_usage_perc", "gpu_cache_usage_perc")
VLLM_NAMES["inter_token_latency_seconds"] = ("inter_token_latency_seconds", "time_per_output_token_seconds")

# vLLM's bucket bounds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``: vLLM's bounds for token-count histograms."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return out
            out.append(mantissa * scale)
        scale *= 10


class RequestMetrics:
    """Counters and histograms over requests, observed as the front end processes outputs."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int) -> None:
        def histogram(name: str, doc: str, buckets: tuple | list) -> Histogram:
            return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, LABELS, registry=registry).labels(model_name)

        tokens = buckets_1_2_5(max_model_len)
        self.prompt_tokens = counter(
            "prompt_tokens", "Prompt tokens of requests that got their first token: whole prompts, prefix-cache hits "
            "included.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        success = Counter(PREFIX + "request_success", "Engine requests finished (one per sample), by finish reason.",
                          LABELS + ["finished_reason"], registry=registry)
        self.model_name, self.success_family = model_name, success
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of one request.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request of two tokens or more: its decode time / (tokens - 1).",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the end.", REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time from queued in the core to first scheduled.",
                               REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "Time from first scheduled to the last token.",
                                   REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Time from first scheduled to the first token.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Time from the first token to the last.",
                                REQUEST_LATENCY_BUCKETS)
        self.request_prompt = histogram("request_prompt_tokens", "Prompt tokens per finished request.", tokens)
        self.request_generation = histogram("request_generation_tokens", "Tokens generated per finished request.",
                                            tokens)
        self.max_generation = histogram("request_max_num_generation_tokens",
                                        "Per user request: the most tokens one of its n samples generated.", tokens)
        self.n = histogram("request_params_n", "The n parameter of user requests.", N_BUCKETS)
        self.max_tokens = histogram("request_params_max_tokens", "The max_tokens of finished requests, resolved.",
                                    tokens)

    def record(self, stats: IterationStats) -> None:
        """``StatsObserver``: one batch of outputs, on the front end's reader thread."""
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        for value in stats.time_to_first_tokens:
            self.ttft.observe(value)
        for value in stats.inter_token_latencies:
            self.itl.observe(value)
        for n, longest in zip(stats.n_params, stats.max_num_generation_tokens):
            self.n.observe(n)
            self.max_generation.observe(longest)
        for req in stats.finished_requests:
            success = self.success.get(req.finish_reason)
            if success is None:  # a reason added to the engine later: still counted, under its own label
                success = self.success[req.finish_reason] = self.success_family.labels(self.model_name,
                                                                                      req.finish_reason)
            success.inc()
            self.e2e.observe(req.e2e_latency)
            self.request_prompt.observe(req.num_prompt_tokens)
            self.request_generation.observe(req.num_generation_tokens)
            self.max_tokens.observe(req.max_tokens)
            if req.queued_time is not None:
                self.queue.observe(req.queued_time)
                self.prefill.observe(req.prefill_time)
                self.decode.observe(req.decode_time)
                self.inference.observe(req.inference_time)
            if req.mean_time_per_output_token is not None:
                self.tpot.observe(req.mean_time_per_output_token)


class CoreCollector(Collector):
    """The engine core's state, from the snapshot the server fetched for this scrape (``stats``)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = CoreStats()

    def collect(self) -> Iterator[Metric]:
        s, labels = self.stats, [self.model_name]
        gauges = (
            ("num_requests_running", "Requests in the running batch.", s.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV pages held by requests (1 = full; idle prefix-cache pages "
             "count as free).", s.kv_usage),
            ("kv_cache_used_pages", "KV pages held by requests.", s.num_used_pages),
            ("kv_cache_total_pages", "KV pages in the pool.", s.num_kv_pages),
            ("prefix_cache_cached_pages", "KV pages held by the prefix cache.", s.num_cached_pages),
        )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(labels, value)
            yield family
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens served by the prefix cache.", s.prefix_cache_hits),
            ("num_preemptions", "Requests preempted for lack of KV pages.", s.num_preemptions),
            ("prompt_tokens_computed", "Prompt tokens run through the model (prefix-cache hits excluded, "
             "recomputation after preemption included).", s.num_prompt_tokens),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(labels, value)
            yield family
        yield self._iteration_tokens(labels)

    def _iteration_tokens(self, labels: list[str]) -> Metric:
        s = self.stats
        counts = s.iteration_tokens_counts or (0,) * (len(ITERATION_TOKENS_BUCKETS) + 1)
        bounds = [floatToGoString(b) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
        family = HistogramMetricFamily(PREFIX + "iteration_tokens_total", "Tokens computed per engine step.",
                                       labels=LABELS)
        family.add_metric(labels, list(zip(bounds, accumulate(counts))), s.iteration_tokens_sum)
        return family


def register_cache_config_info(registry: CollectorRegistry, model_name: str, config: EngineConfig,
                               num_kv_pages: int) -> None:
    """The KV cache's configuration as labels of a gauge set to 1 (vLLM's names for them)."""
    info = {
        "block_size": config.block_size, "num_gpu_blocks": num_kv_pages,
        "num_gpu_blocks_override": config.num_kv_blocks, "enable_prefix_caching": config.enable_prefix_caching,
        "gpu_memory_utilization": config.gpu_memory_utilization, "cache_dtype": config.dtype,
    }
    gauge = Gauge(PREFIX + "cache_config_info", "Information of the KV cache's configuration.",
                  LABELS + list(info), registry=registry)
    gauge.labels(model_name, *(str(v) for v in info.values())).set(1)
