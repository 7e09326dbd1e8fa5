"""GET /metrics: Prometheus text exposition (format 0.0.4), written by hand from the engine's stats.

Names follow vLLM's with a ``nanovllm:`` prefix. Gauges and counters come from the engine core's latest snapshot;
latency histograms from the front end, which times tokens as the server sees them.
"""
from __future__ import annotations

from nanovllm.engine.serving_stats import CoreStats, FrontendStats, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{_escape(model_name)}"'
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, value: float, extra: str = "") -> None:
        self.header(name, kind, help_text)
        self.sample(name, value, extra)

    def header(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, extra: str = "") -> None:
        labels = self.labels + (f",{extra}" if extra else "")
        self.lines.append(f"{name}{{{labels}}} {_number(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self.header(name, "histogram", help_text)
        for bound, count in hist.cumulative():
            self.sample(f"{name}_bucket", count, f'le="{_number(bound)}"')
        self.sample(f"{name}_sum", hist.sum)
        self.sample(f"{name}_count", hist.count)


def render_metrics(core: CoreStats, front: FrontendStats, model_name: str) -> str:
    w = _Writer(model_name)
    w.metric("nanovllm:num_requests_running", "gauge", "Requests in the running batch.", core.num_running)
    w.metric("nanovllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", core.num_waiting)
    w.metric("nanovllm:kv_cache_usage_perc", "gauge",
             "Fraction of KV pages held by requests (1 = full; idle prefix-cache pages count as free).",
             core.kv_usage)
    w.metric("nanovllm:kv_cache_used_pages", "gauge", "KV pages held by requests.", core.num_used_pages)
    w.metric("nanovllm:kv_cache_total_pages", "gauge", "KV pages in the pool.", core.num_kv_pages)
    w.metric("nanovllm:prefix_cache_cached_pages", "gauge", "KV pages held by the prefix cache.",
             core.num_cached_pages)
    w.metric("nanovllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
             core.prefix_cache_queries)
    w.metric("nanovllm:prefix_cache_hits_total", "counter", "Prompt tokens served by the prefix cache.",
             core.prefix_cache_hits)
    w.metric("nanovllm:prompt_tokens_total", "counter", "Prompt tokens computed (prefix-cache hits excluded).",
             core.num_prompt_tokens)
    w.metric("nanovllm:generation_tokens_total", "counter", "Tokens generated.", core.num_generated_tokens)
    w.metric("nanovllm:num_preemptions_total", "counter", "Requests preempted for lack of KV pages.",
             core.num_preemptions)
    w.header("nanovllm:request_success_total", "counter", "Engine requests finished, by finish reason.")
    for reason in ("stop", "length", "abort"):
        w.sample("nanovllm:request_success_total", front.finished.get(reason, 0), f'finished_reason="{reason}"')
    w.histogram("nanovllm:time_to_first_token_seconds", "Time from arrival to the first token.", front.ttft)
    w.histogram("nanovllm:inter_token_latency_seconds", "Time between two tokens of one request.",
                front.inter_token)
    w.histogram("nanovllm:e2e_request_latency_seconds", "Time from arrival to the last token.", front.e2e)
    return "\n".join(w.lines) + "\n"
