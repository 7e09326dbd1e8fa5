"""The typed values that cross between a front end and the engine core: the request spec the input processor makes,
the core's per-step outputs, and the messages over the pipe when the core runs in its own process."""
from __future__ import annotations

from dataclasses import dataclass

from nanovllm.engine.serving_stats import CoreStats, RequestTimings
from nanovllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate, validated: the core builds its own ``Request`` from this."""

    request_id: str  # a sample of an ``n > 1`` request has its own id (``{id}#{i}``)
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None
    sampling_seed: int  # resolved: the user's seed, one derived from it per sample, or one drawn by the engine
    eos_token_ids: frozenset[int]
    arrival_time: float


@dataclass
class EngineCoreOutput:
    """What one step gave one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None  # one dict per new token
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the first token only
    timings: RequestTimings | None = None  # with the first token only: when the core queued and scheduled it


@dataclass(frozen=True)
class StopString:
    """The front end found a stop string in a request's text; the core ends the request there."""

    request_id: str
    stop: str


# ---- front end -> engine-core process ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequests:
    requests: tuple[EngineRequest, ...]


@dataclass(frozen=True)
class AbortRequests:
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class FinishRequests:
    stops: tuple[StopString, ...]


@dataclass(frozen=True)
class QueryStats:
    query_id: int


@dataclass(frozen=True)
class Shutdown:
    pass


ToCore = AddRequests | AbortRequests | FinishRequests | QueryStats | Shutdown


# ---- engine-core process -> front end ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreReady:
    num_kv_pages: int


@dataclass(frozen=True)
class CoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: CoreStats | None = None  # attached now and then while busy, and once when the core goes idle
    timestamp: float = 0.0  # when the core made these outputs (its time.monotonic()): tokens' times, for metrics


@dataclass(frozen=True)
class RequestFailed:
    """One request failed inside the core; the others and the engine go on."""

    request_id: str
    message: str


@dataclass(frozen=True)
class StatsReply:
    query_id: int
    stats: CoreStats


@dataclass(frozen=True)
class CoreFailed:
    """The core could not start, or cannot go on; it exits after sending this."""

    message: str


FromCore = CoreReady | CoreOutputs | RequestFailed | StatsReply | CoreFailed
