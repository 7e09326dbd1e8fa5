"""/metrics: vLLM's series under ``nanovllm:`` and ``vllm:``, their values against independent counts (what was sent,
what the responses say), the HTTP and process series, and the Grafana dashboard in examples/ reading only series a
live server exports."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import REPO_ROOT, ServerProcess, parse_metrics, startup_limit_s

from nanovllm.engine.messages import EngineCoreOutput, EngineRequest
from nanovllm.engine.serving_stats import FinishedRequestStats, FrontendStats, IterationStats, RequestTimings
from nanovllm.entrypoints.openai.metric_series import RequestMetrics, buckets_1_2_5
from nanovllm.entrypoints.openai.metrics import VllmAliases
from nanovllm.sampling_params import SamplingParams

DASHBOARD = Path(REPO_ROOT) / "examples" / "grafana" / "nanovllm-dashboard.json"
MODEL = "tiny"
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 24  # 384 tokens: four concurrent requests of ~170 tokens do not fit, so some are preempted

# The series vLLM's example Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) queries.
VLLM_DASHBOARD_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket", "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count", "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count", "vllm:gpu_cache_usage_perc", "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket", "vllm:request_success_total", "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
)


# ---- PromQL: the metric names an expression reads -------------------------------------------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                    "offset"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana ``label_values(...)`` query)."""
    expr = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"\1", expr)  # its last argument is a label
    expr = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", expr):  # (not the unit of a duration: 5m)
        rest = expr[match.end():].lstrip()
        if match.group() not in _PROMQL_KEYWORDS and not rest.startswith("("):  # not a function
            names.add(match.group())
    return names


def test_promql_metric_names() -> None:
    expr = ('histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name='
            '"$model_name"}[$__rate_interval]))) / on(instance) group_left process_open_fds offset 5m')
    assert promql_metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "process_open_fds"}
    assert promql_metric_names('label_values(nanovllm:num_requests_running{model_name="x"}, instance)') == {
        "nanovllm:num_requests_running"}
    assert promql_metric_names('label_values({__name__=~"nanovllm:.*"}, model_name)') == set()


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return queries


# ---- front-end bookkeeping, without a server ----------------------------------------------------------------------

def _spec(request_id: str, num_prompt: int, max_tokens: int, arrival: float) -> EngineRequest:
    return EngineRequest(request_id, tuple(range(num_prompt)), SamplingParams(max_tokens=max_tokens), max_tokens,
                         0, frozenset(), arrival)


class _Recorder:
    def __init__(self) -> None:
        self.items: list[IterationStats] = []

    def record(self, stats: IterationStats) -> None:
        self.items.append(stats)

    def finished(self) -> dict[str, FinishedRequestStats]:
        return {f"{i}": f for i, f in enumerate(f for it in self.items for f in it.finished_requests)}


def test_frontend_stats_intervals_from_timestamps() -> None:
    """Timestamps chosen by hand: front end's clock for arrival/TTFT/e2e, core's for the phases and token gaps."""
    stats, rec = FrontendStats(), _Recorder()
    stats.add_observer(rec)
    stats.on_added([_spec("a", 7, 4, arrival=10.0)])
    first = EngineCoreOutput("a", [5], timings=RequestTimings(queued=100.0, scheduled=100.5))
    stats.on_outputs([first], core_timestamp=102.0, now=12.5)
    stats.on_outputs([EngineCoreOutput("a", [6])], core_timestamp=103.0, now=13.6)
    stats.on_outputs([EngineCoreOutput("a", [7])], core_timestamp=105.5, now=16.0)
    stats.on_outputs([EngineCoreOutput("a", [8], finish_reason="length")], core_timestamp=106.0, now=16.7)
    stats.on_outputs([EngineCoreOutput("a", [9])], core_timestamp=107.0, now=17.0)  # late: ignored
    assert sum(i.num_prompt_tokens for i in rec.items) == 7 and sum(i.num_generation_tokens for i in rec.items) == 4
    assert [t for i in rec.items for t in i.time_to_first_tokens] == [2.5]
    assert [t for i in rec.items for t in i.inter_token_latencies] == [1.0, 2.5, 0.5]
    done = rec.finished()["0"]
    assert done == FinishedRequestStats("length", 7, 4, 4, e2e_latency=pytest.approx(6.7), queued_time=0.5,
                                        prefill_time=1.5, decode_time=4.0, inference_time=5.5,
                                        mean_time_per_output_token=pytest.approx(4.0 / 3))
    assert stats.finished == {"length": 1}


def test_frontend_stats_n_samples_abort_and_stop() -> None:
    stats, rec = FrontendStats(), _Recorder()
    stats.add_observer(rec)
    stats.on_added([_spec(f"r#{i}", 3, 8, arrival=0.0) for i in range(3)])
    timings = RequestTimings(1.0, 2.0)
    stats.on_outputs([EngineCoreOutput(f"r#{i}", [1], timings=timings) for i in range(3)], 3.0, now=3.0)
    stats.on_outputs([EngineCoreOutput("r#0", [1]), EngineCoreOutput("r#1", [1], finish_reason="stop")], 4.0, 4.0)
    assert not any(i.n_params for i in rec.items)  # the user request is not over yet
    stats.on_removed("r#0", "stop", now=5.0)  # a stop string found in the front end
    stats.on_removed("r#2", now=6.0)  # aborted
    stats.on_removed("r#2", now=7.0)  # twice: counted once
    assert stats.finished == {"stop": 2, "abort": 1}
    assert [n for i in rec.items for n in i.n_params] == [3]
    assert [m for i in rec.items for m in i.max_num_generation_tokens] == [2]
    by_reason = {f.finish_reason + str(f.num_generation_tokens): f for f in rec.finished().values()}
    assert by_reason["abort1"].decode_time == 0.0 and by_reason["abort1"].mean_time_per_output_token is None
    assert by_reason["stop2"].decode_time == 1.0
    # a request that never got a token has no phases (and its failure counts as an error)
    stats.on_added([_spec("x", 3, 8, arrival=0.0)])
    stats.on_outputs([EngineCoreOutput("x", [], finish_reason="error")], 9.0, now=9.0)
    last = rec.items[-1].finished_requests[0]
    assert (last.finish_reason, last.queued_time, last.e2e_latency) == ("error", None, 9.0)


def test_a_failing_observer_does_not_stop_the_others() -> None:
    class Broken:
        def record(self, stats: IterationStats) -> None:
            raise RuntimeError("broken")

    stats, rec = FrontendStats(), _Recorder()
    stats.add_observer(Broken())
    stats.add_observer(rec)
    stats.on_added([_spec("a", 3, 1, arrival=0.0)])
    stats.on_outputs([EngineCoreOutput("a", [1], "length", timings=RequestTimings(0.0, 0.0))], 1.0, now=1.0)
    assert len(rec.finished()) == 1


def test_vllm_aliases_repeat_our_families() -> None:
    ours = CollectorRegistry()
    metrics = RequestMetrics(ours, "m", max_model_len=100)
    metrics.record(IterationStats(num_prompt_tokens=7, num_generation_tokens=3, inter_token_latencies=[0.02, 0.3],
                                  finished_requests=[FinishedRequestStats("stop", 7, 3, 10, 1.0, 0.1, 0.2, 0.3, 0.5,
                                                                          0.15)]))
    aliases = CollectorRegistry()
    aliases.register(VllmAliases(ours))
    ours_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(generate_latest(ours).decode()) for s in f.samples}
    alias_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                     for f in text_string_to_metric_families(generate_latest(aliases).decode()) for s in f.samples}
    assert alias_samples and all(name.startswith("vllm:") for name, _ in alias_samples)
    for (name, labels), value in alias_samples.items():
        own = name.replace("vllm:time_per_output_token", "vllm:inter_token_latency").replace("vllm:", "nanovllm:")
        assert ours_samples[(own, labels)] == value, name
    assert alias_samples[("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 1
    assert buckets_1_2_5(100) == [1, 2, 5, 10, 20, 50, 100] and buckets_1_2_5(1999)[-1] == 1000


# ---- a live server -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(qwen3_dir, "--served-model-name", MODEL, "--max-model-len", "256",
                        "--num-kv-blocks", str(NUM_KV_BLOCKS), "--block-size", str(BLOCK_SIZE))
    try:
        yield srv
    finally:
        srv.stop()


def _complete(server: ServerProcess, prompt: list[int], max_tokens: int, **extra: object) -> dict:
    status, body = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": prompt,
                                                              "max_tokens": max_tokens, "ignore_eos": True, **extra})
    assert status == 200, body
    return body


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 131 + i * 7) % 500 + 1 for i in range(length)]


def test_counts_equal_what_was_sent(server: ServerProcess) -> None:
    cases = [(_prompt(1, 5), 3, 1), (_prompt(2, 23), 9, 1), (_prompt(3, 40), 1, 1), (_prompt(4, 11), 6, 2)]
    before = server.metrics()
    bodies = [_complete(server, prompt, max_tokens, n=n) for prompt, max_tokens, n in cases]
    after = server.metrics()
    d = lambda name: _delta(after, before, "nanovllm:" + name)  # noqa: E731
    samples = [(len(p), m) for p, m, n in cases for _ in range(n)]  # one engine request per sample
    generated = [m for _, m in samples]  # ignore_eos: max_tokens each
    assert sum(b["usage"]["completion_tokens"] for b in bodies) == sum(generated)
    assert d("prompt_tokens_total") == sum(p for p, _ in samples)
    assert d("generation_tokens_total") == sum(generated)
    assert d('request_success_total{finished_reason="length"}') == len(samples)
    assert d("request_prompt_tokens_count") == len(samples) and d("request_prompt_tokens_sum") == sum(
        p for p, _ in samples)
    for bound in (5, 10, 20, 50):  # cumulative buckets, counted from the lengths sent
        assert d(f'request_prompt_tokens_bucket{{le="{bound}.0"}}') == sum(p <= bound for p, _ in samples), bound
    assert d("request_generation_tokens_sum") == sum(generated)
    assert d("request_params_max_tokens_sum") == sum(m for _, m in samples)
    assert d("request_params_n_count") == len(cases) and d("request_params_n_sum") == sum(n for *_, n in cases)
    assert d("request_max_num_generation_tokens_sum") == sum(m for _, m, _ in cases)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds"):
        assert d(name + "_count") == len(samples), name
    assert d("inter_token_latency_seconds_count") == sum(m - 1 for _, m in samples)
    assert d("request_time_per_output_token_seconds_count") == sum(m > 1 for _, m in samples)
    # without preemption each step computes every prompt token not served from the cache once, and one token per
    # decode (the last token is sampled, never fed back)
    assert d("num_preemptions_total") == 0
    assert d("iteration_tokens_total_sum") == (sum(p for p, _ in samples) - d("prefix_cache_hits_total")
                                               + sum(m - 1 for _, m in samples))
    assert d("iteration_tokens_total_count") >= max(m for _, m in samples)
    assert d("prompt_tokens_computed_total") == sum(p for p, _ in samples) - d("prefix_cache_hits_total")


def test_a_prefix_cache_hit_still_counts_the_whole_prompt(server: ServerProcess) -> None:
    prompt = _prompt(9, 3 * BLOCK_SIZE + 5)
    _complete(server, prompt, 2)
    before = server.metrics()
    body = _complete(server, prompt, 2)
    after = server.metrics()
    hits = _delta(after, before, "nanovllm:prefix_cache_hits_total")
    assert hits >= 3 * BLOCK_SIZE  # the repeat was served from the cache ...
    assert _delta(after, before, "nanovllm:prompt_tokens_total") == body["usage"]["prompt_tokens"] == len(prompt)
    assert _delta(after, before, "nanovllm:prompt_tokens_computed_total") == len(prompt) - hits  # ... computed less
    assert _delta(after, before, "nanovllm:prefix_cache_queries_total") >= len(prompt) - 1


def test_preempted_requests_count_their_prompt_once(server: ServerProcess) -> None:
    prompts = [_prompt(20 + i, 40) for i in range(4)]
    before = server.metrics()
    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(lambda p: _complete(server, p, 130), prompts))
    after = server.metrics()
    preemptions = _delta(after, before, "nanovllm:num_preemptions_total")
    assert preemptions > 0  # 4 x 170 tokens do not fit 384
    assert _delta(after, before, "nanovllm:prompt_tokens_total") == sum(b["usage"]["prompt_tokens"] for b in bodies)
    assert _delta(after, before, "nanovllm:generation_tokens_total") == 4 * 130
    assert _delta(after, before, "nanovllm:request_prompt_tokens_sum") == 4 * 40
    assert after["vllm:num_preemptions_total"] == after["nanovllm:num_preemptions_total"]


def test_gauges_while_a_request_runs(server: ServerProcess) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=startup_limit_s())
    try:
        conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": _prompt(40, 30),
                                                            "max_tokens": 200, "ignore_eos": True, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        response.readline()  # the first event: the request runs
        m = server.metrics()
        assert m["nanovllm:num_requests_running"] == 1 and m["nanovllm:num_requests_waiting"] == 0
        used = m["nanovllm:kv_cache_used_pages"]
        assert 30 / BLOCK_SIZE <= used <= (30 + 200) / BLOCK_SIZE + 1
        assert m["nanovllm:kv_cache_usage_perc"] == pytest.approx(used / NUM_KV_BLOCKS)
        assert m["vllm:kv_cache_usage_perc"] == m["vllm:gpu_cache_usage_perc"] == m["nanovllm:kv_cache_usage_perc"]
        assert m["nanovllm:kv_cache_total_pages"] == NUM_KV_BLOCKS
    finally:
        conn.close()


def test_http_series_by_route_and_status(server: ServerProcess) -> None:
    ok = 'http_requests_total{handler="/v1/completions",method="POST",status="2xx"}'
    bad = 'http_requests_total{handler="/v1/completions",method="POST",status="4xx"}'
    before = server.metrics()
    _complete(server, [1, 2, 3], 1)
    status, _ = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": [1], "no_such_field": 1})
    assert status == 400
    assert server.request("GET", "/health")[0] == 200
    after = server.metrics()
    assert (_delta(after, before, ok), _delta(after, before, bad)) == (1, 1)
    assert _delta(after, before, 'http_request_duration_seconds_count{handler="/v1/completions",method="POST"}') == 2
    assert not any("/metrics" in name or "/health" in name for name in after if name.startswith("http_"))


def test_process_series_name_both_processes(server: ServerProcess) -> None:
    m = server.metrics()
    core = psutil.Process(server.engine_core_pid())
    assert m["nanovllm_engine_core_process_start_time_seconds"] == pytest.approx(core.create_time(), abs=1.0)
    assert m["process_start_time_seconds"] == pytest.approx(psutil.Process(server.proc.pid).create_time(), abs=1.0)
    assert m["process_resident_memory_bytes"] > 0 and m["nanovllm_engine_core_process_resident_memory_bytes"] > 0
    assert any(name.startswith("python_gc_collections_total") for name in m)


def test_cache_config_info(server: ServerProcess) -> None:
    _, text = server.request("GET", "/metrics")
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "nanovllm:cache_config_info"]
    (sample,) = family.samples
    assert sample.value == 1 and sample.labels["model_name"] == MODEL
    assert (sample.labels["block_size"], sample.labels["num_gpu_blocks"]) == (str(BLOCK_SIZE), str(NUM_KV_BLOCKS))
    assert sample.labels["enable_prefix_caching"] == "True"


def test_every_series_the_dashboards_query_is_exported(server: ServerProcess) -> None:
    _complete(server, _prompt(50, 12), 4)
    status, _ = server.request("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 3,
                                                                "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    deadline = time.monotonic() + startup_limit_s()
    exported: set[str] = set()
    wanted = set().union(*map(promql_metric_names, dashboard_queries()))
    while not wanted <= exported and time.monotonic() < deadline:  # the core's counters arrive with its snapshot
        _, text = server.request("GET", "/metrics")
        exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        time.sleep(0.05)
    assert len(wanted) >= 30 and all(n.startswith(("nanovllm", "http_", "process_")) for n in wanted)
    assert wanted <= exported, sorted(wanted - exported)
    assert set(VLLM_DASHBOARD_SERIES) <= exported, sorted(set(VLLM_DASHBOARD_SERIES) - exported)
    m = parse_metrics(text)
    for name in VLLM_DASHBOARD_SERIES:  # the same numbers under both names
        for key in (k for k in m if k.split("{")[0] == name):
            own = key.replace("vllm:time_per_output_token", "vllm:inter_token_latency").replace(
                "vllm:gpu_cache", "vllm:kv_cache").replace("vllm:", "nanovllm:")
            assert m[key] == m[own], key
