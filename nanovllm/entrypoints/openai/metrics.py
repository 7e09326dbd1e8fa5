"""GET /metrics: Prometheus exposition by ``prometheus_client``, for one server's private registry.

Naming rule (docs/metrics.md): every engine series is exported as ``nanovllm:<name>``, with vLLM's name, type,
labels, buckets and meaning. A series that means exactly what a vLLM series means is exported a second time under
vLLM's own name (``vllm:<name>``, and vLLM's deprecated spelling where its dashboard still queries one), so that
vLLM's Grafana dashboards, alerts and autoscalers read this server unchanged. Series vLLM does not have stay
``nanovllm:`` only. Process, Python and HTTP series carry the standard unprefixed names (``process_*``,
``python_*``, ``http_*``) as in vLLM, plus ``nanovllm_engine_core_process_*`` for the engine-core process.
"""
from __future__ import annotations

from typing import Iterator

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator

from nanovllm.engine.async_llm import AsyncLLM
from nanovllm.entrypoints.openai.metric_series import (
    PREFIX,
    VLLM_NAMES,
    CoreCollector,
    RequestMetrics,
    register_cache_config_info,
)

VLLM_PREFIX = "vllm:"
# not counted as HTTP traffic: scrapes and health probes, which would drown the API's own (as in vLLM)
EXCLUDED_HANDLERS = ["^/metrics$", "^/health$"]


class VllmAliases(Collector):
    """The families of ``source`` that vLLM also has, again under vLLM's names."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            for alias in VLLM_NAMES.get(family.name.removeprefix(PREFIX), ()):
                yield _renamed(family, VLLM_PREFIX + alias)


def _renamed(family: Metric, name: str) -> Metric:
    out = Metric(name, family.documentation, family.type, family.unit)
    out.samples = [sample._replace(name=name + sample.name[len(family.name):]) for sample in family.samples]
    return out


class ServerMetrics:
    """One server's registry: the engine's series (``nanovllm:`` and their ``vllm:`` aliases), the processes'
    series and the HTTP series."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.engine_series = CollectorRegistry()  # every nanovllm: family
        self.requests = RequestMetrics(self.engine_series, model_name, engine.max_model_len)
        self.core = CoreCollector(model_name)
        self.engine_series.register(self.core)
        register_cache_config_info(self.engine_series, model_name, engine.config, engine.core.num_kv_pages)
        self.registry = CollectorRegistry()
        self.registry.register(self.engine_series)
        self.registry.register(VllmAliases(self.engine_series))
        ProcessCollector(registry=self.registry)
        ProcessCollector(namespace="nanovllm_engine_core", pid=lambda: engine.core.pid, registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        engine.stats.add_observer(self.requests)

    async def render(self) -> bytes:
        self.core.stats = await self.engine.get_core_stats(timeout_s=0.5)
        return generate_latest(self.registry)


def install_metrics(app: FastAPI, engine: AsyncLLM, model_name: str) -> ServerMetrics:
    """``GET /metrics``, and the HTTP series of every other route (count by route, method and status class;
    latency and sizes), measured by prometheus-fastapi-instrumentator's middleware."""
    metrics = ServerMetrics(engine, model_name)
    Instrumentator(excluded_handlers=EXCLUDED_HANDLERS, registry=metrics.registry).instrument(app)

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text exposition.", "content": {CONTENT_TYPE_LATEST: {}}}})
    async def get_metrics() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return metrics
