"""The step loop: schedule a batch, run it, fold the sampled tokens back into the requests."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from torch.profiler import record_function

from nanovllm.config import EngineConfig
from nanovllm.engine.kv_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None  # one dict per new token
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the first token only


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0  # prompt tokens computed (cache hits excluded, recomputation included)
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens served from it
    step_time_s: float = 0.0  # wall time inside step()
    host_time_s: float = 0.0  # of that, time the host was busy (not waiting for the device)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: object) -> None:
        self.config = config
        self.executor = executor
        self.kv = KVCacheManager(executor.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        # a pipeline of N stages keeps N disjoint micro-batches in flight, so no stage waits for the others
        num_micro_batches = getattr(executor, "num_micro_batches", 1)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len, num_micro_batches
        )
        self.stats = EngineStats()
        overlap = config.async_scheduling
        self.overlap = getattr(executor, "device_type", "cpu") == "cuda" if overlap is None else overlap
        # steps left running between calls of step(): one more with overlap scheduling, and with micro-batches
        # one fewer than their number (the last is launched just before the oldest is collected)
        self.num_micro_batches = num_micro_batches
        self.max_in_flight = (num_micro_batches - 1) + (1 if self.overlap else 0)
        self.in_flight: deque[tuple[SchedulerOutput, Any]] = deque()

    @property
    def num_kv_pages(self) -> int:
        return self.kv.num_pages

    def check_fits(self, request: Request) -> None:
        """A request that could never fit in the pool would wait forever: refuse it up front."""
        needed = self.kv.pages_for(request.num_prompt_tokens + request.max_tokens)
        if needed > self.kv.num_pages:
            raise ValueError(
                f"the prompt ({request.num_prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) needs "
                f"{needed} KV pages, but the whole pool has {self.kv.num_pages} "
                f"({self.kv.num_pages * self.config.block_size} tokens)"
            )

    def add_request(self, request: Request) -> None:
        self.check_fits(request)
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        if not self.scheduler.has_unfinished() and self.num_micro_batches == 1:
            # its results would belong to no one; the device finishes it regardless (a pipeline's stages are still
            # collected, since its ranks expect every launched step's messages to be received)
            self.in_flight.clear()

    def finish_request(self, request_id: str, stop_reason: str) -> None:
        """A stop string was found by the front end."""
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop_reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """One scheduling round. With overlap, step N+1 is scheduled and queued on the device before step N's
        results are read back, so the host's work hides behind the device's; results arrive one call late. With
        micro-batches, up to ``max_in_flight`` steps stay launched; the oldest is collected when a newer one is
        launched, or when nothing new could be scheduled."""
        start = time.perf_counter()
        # the named ranges show up in a torch profiler trace (bench throughput --profile)
        with record_function("nanovllm.schedule"):
            sched = self.scheduler.schedule()
        if not sched.is_empty:
            with record_function("nanovllm.launch"):
                self.in_flight.append((sched, self.executor.launch(sched)))
        updated = []
        if self.in_flight and (len(self.in_flight) > self.max_in_flight or sched.is_empty):
            done_sched, pending = self.in_flight.popleft()
            with record_function("nanovllm.collect"):
                result = self.executor.collect(pending)
            with record_function("nanovllm.update"):
                updated = self.scheduler.update(done_sched, result)
            self._count(done_sched, len(updated))
        step_time = time.perf_counter() - start
        self.stats.step_time_s += step_time
        self.stats.host_time_s += step_time - getattr(self.executor, "take_wait_time", lambda: 0.0)()
        return [self._output(request, token, logprobs) for request, token, logprobs in updated]

    @staticmethod
    def _output(request: Request, token: int, logprobs: dict[int, float] | None) -> EngineCoreOutput:
        out = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            finish_reason=request.status.value if request.is_finished else None,
            stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            logprobs=None if logprobs is None else [logprobs],
        )
        if request.sampling_params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            out.prompt_logprobs = [None, *request.prompt_logprobs]
            request.prompt_logprobs_sent = True
        return out

    def _count(self, sched: object, num_generated: int) -> None:
        stats = self.stats
        stats.num_steps += 1
        stats.num_generated_tokens += num_generated
        stats.num_preemptions = self.scheduler.num_preemptions
        cache = self.kv.prefix_cache
        if cache is not None:
            stats.prefix_cache_queries, stats.prefix_cache_hits = cache.stats.query_tokens, cache.stats.hit_tokens
        for chunk in sched.chunks:
            if chunk.start < chunk.request.num_prompt_tokens:
                stats.num_prompt_tokens += min(chunk.num_tokens, chunk.request.num_prompt_tokens - chunk.start)

    def kv_usage(self) -> float:
        return self.kv.allocator.num_used / self.kv.num_pages
