"""The step loop: schedule a batch, run it, fold the sampled tokens back into the requests."""
from __future__ import annotations

import logging
import time
from concurrent import futures
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from torch.profiler import record_function

from nanovllm.config import EngineConfig
from nanovllm.engine.batch_builder import build_host_batch
from nanovllm.engine.kv_manager import KVCacheManager
from nanovllm.engine.messages import EngineCoreOutput, EngineRequest
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import Scheduler, SchedulerOutput
from nanovllm.engine.serving_stats import ITERATION_TOKENS_BUCKETS, CoreStats, Histogram, RequestTimings
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.executor.base import Executor, LaunchedStep
from nanovllm.executor.input_batch import HostBatch

logger = logging.getLogger(__name__)


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


@dataclass
class _InFlight:
    sched: SchedulerOutput
    step: LaunchedStep
    grammar_rows: list[int] = field(default_factory=list)  # sampled rows whose grammar bitmask is still to come


# (request, its new token or None for none, its logprobs) for one output of a step
_Update = tuple[Request, int | None, "dict[int, float] | None"]


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor,
                 load_tokenizer: Callable[[], Any] | None = None) -> None:
        """``load_tokenizer``: for structured outputs, whose grammars are compiled against the vocabulary."""
        self.config = config
        self.executor = executor
        self.structured = None if load_tokenizer is None else StructuredOutputManager(
            config.structured_outputs_backend, config.hf_config.vocab_size, load_tokenizer)
        self._compiling: list[Request] = []  # requests waiting for their grammar
        self.vocab_size: int = config.hf_config.vocab_size
        self.kv = KVCacheManager(executor.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        # a pipeline of N stages keeps N disjoint micro-batches in flight, so no stage waits for the others
        num_micro_batches = executor.num_micro_batches
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len, num_micro_batches
        )
        self.stats = EngineStats()
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)  # tokens each step computed
        overlap = config.async_scheduling
        self.overlap = executor.device_type == "cuda" if overlap is None else overlap
        # steps left running between calls of step(): one more with overlap scheduling, and with micro-batches
        # one fewer than their number (the last is launched just before the oldest is collected)
        self.num_micro_batches = num_micro_batches
        self.max_in_flight = (num_micro_batches - 1) + (1 if self.overlap else 0)
        self.in_flight: deque[_InFlight] = deque()
        self._to_accept: list[tuple[Request, int]] = []  # collected tokens of constrained rows, for their matchers
        self._progressed = True  # whether the last step() collected a step or gave an output

    @property
    def num_kv_pages(self) -> int:
        return self.kv.num_pages

    def add_request(self, spec: EngineRequest) -> None:
        """Queue a request the input processor made (which checked that it fits the pool)."""
        request = Request.from_spec(spec)
        constraint = spec.sampling_params.structured_outputs
        if constraint is not None:
            if self.structured is None:
                raise ValueError("structured_outputs need a tokenizer, and this engine has none")
            request.grammar = self.structured.start(constraint, spec.eos_token_ids)
            self._compiling.append(request)
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        if not self.scheduler.has_unfinished() and self.num_micro_batches == 1:
            # its results would belong to no one; the device finishes it regardless (a pipeline's stages are still
            # collected, since its ranks expect every launched step's messages to be received)
            self.in_flight.clear()
            self._to_accept.clear()

    def finish_request(self, request_id: str, stop_reason: str) -> None:
        """A stop string was found by the front end."""
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED, stop_reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """One scheduling round. With overlap, step N+1 is scheduled and queued on the device before step N's
        results are read back, so the host's work hides behind the device's; results arrive one call late. With
        micro-batches, up to ``max_in_flight`` steps stay launched; the oldest is collected when a newer one is
        launched, or when nothing new could be scheduled. Constrained rows: see ``_advance_grammars``."""
        start, steps_before = time.perf_counter(), self.stats.num_steps
        failed = self._poll_grammars()
        # the named ranges show up in a torch profiler trace (bench throughput --profile)
        with record_function("nanovllm.schedule"):
            sched = self.scheduler.schedule()
        updated: list[_Update] = []
        launched = None
        if not sched.is_empty:
            with record_function("nanovllm.launch"):
                constrained = any(chunk.request.grammar for chunk in sched.sampled_chunks)
                if constrained and not self.executor.samples_later:
                    # the bitmask goes with the launch, and needs every earlier token accepted
                    while self.in_flight:
                        updated += self._collect_oldest()
                    self._advance_grammars(updated, None, sched)
                if not sched.is_empty:  # (the grammars may have ended every request of it)
                    launched = self._launch(sched, self._build(sched, failed))
        awaiting_mask = launched if launched is not None and launched.grammar_rows else None
        if self.in_flight and (len(self.in_flight) > self.max_in_flight or sched.is_empty):
            if awaiting_mask is not None and self.in_flight[0] is awaiting_mask:  # collected at once: sample first
                self._advance_grammars(updated, awaiting_mask)
                awaiting_mask = None
            updated += self._collect_oldest()
        if self._to_accept or awaiting_mask is not None:
            self._advance_grammars(updated, awaiting_mask)
        updated = [(r, -1, None) for r in failed] + updated
        step_time = time.perf_counter() - start
        self.stats.step_time_s += step_time
        self.stats.host_time_s += step_time - self.executor.take_wait_time()
        outputs = []
        for request, token, logprobs in updated:
            try:
                outputs.append(self._output(request, token, logprobs))
            except Exception as exc:  # noqa: BLE001 - one request's fault
                self.scheduler.fail_request(request, exc)
                outputs.append(EngineCoreOutput(request.request_id, [], "error", f"{type(exc).__name__}: {exc}"))
        self._progressed = bool(outputs) or self.stats.num_steps != steps_before
        return outputs

    def is_stalled(self) -> bool:
        """Whether stepping again at once would only spin: the last step() made no progress and no step is in
        flight. Requests that fit the pool are always schedulable, so the ones left wait on something else (e.g. a
        grammar compile); a caller stepping in a loop should block on what it waits for instead."""
        return not self._progressed and not self.in_flight

    def _launch(self, sched: SchedulerOutput, host: HostBatch) -> _InFlight:
        launched = _InFlight(sched, None)  # type: ignore[arg-type]
        grammar_rows = [row for row, chunk in enumerate(sched.sampled_chunks) if chunk.request.grammar]
        if grammar_rows:
            host.sampling.grammar_rows = np.asarray(grammar_rows, dtype=np.int64)
            if self.executor.samples_later:
                launched.grammar_rows = grammar_rows  # sampled once the earlier tokens have reached the matchers
            else:
                host.sampling.grammar_bitmask = self._grammar_bitmask(sched, grammar_rows)
        launched.step = self.executor.launch(host)
        self.in_flight.append(launched)
        for row, chunk in enumerate(sched.sampled_chunks):  # where the next step finds the token
            chunk.request.sample_row = row
        return launched

    def _grammar_bitmask(self, sched: SchedulerOutput, rows: list[int]) -> np.ndarray:
        chunks = sched.sampled_chunks
        return self.structured.bitmask([chunks[row].request.grammar.matcher for row in rows])

    def _collect_oldest(self) -> list[_Update]:
        done = self.in_flight.popleft()
        with record_function("nanovllm.collect"):
            result = self.executor.collect(done.step)
        with record_function("nanovllm.update"):
            updates = self.scheduler.update(done.sched, result)
            self._to_accept += [(request, token) for request, token, _ in updates
                                if request.grammar is not None and token >= 0]
        self._count(done.sched, sum(1 for _, token, _ in updates if token >= 0))
        return updates

    def _advance_grammars(self, updated: list[_Update], launched: _InFlight | None,
                          sched: SchedulerOutput | None = None) -> None:
        """The matchers take the collected tokens; ``launched`` (a step launched without its bitmask) gets the
        bitmask and is sampled; requests whose grammar refused a token or can take no more end, each with an output
        of no new token (and leave ``sched``, a step not yet launched).

        Done on the step loop's thread, right after a collect: the backends release the GIL in every call, and a
        second thread taking it back waits up to the interpreter's switch interval (5 ms) while the loop runs
        Python, so on a thread of its own this work (a few hundred microseconds) finished only when the loop
        blocked on it (``python -m nanovllm.benchmarks.engine_host --structured-fraction 0.5``). The forward of
        ``launched`` is already queued, so the device runs it meanwhile."""
        sampled, self._to_accept = self._to_accept, []
        with record_function("nanovllm.grammar"):
            accepted = self.structured.accept([request.grammar.matcher for request, _ in sampled],
                                              [token for _, token in sampled])
            if launched is not None:
                chunks = launched.sched.sampled_chunks
                bitmask = self.structured.bitmask([chunks[row].request.grammar.matcher
                                                   for row in launched.grammar_rows])
                self.executor.sample(launched.step, bitmask)
                launched.grammar_rows = []
        reported = None
        for (request, token), ok in zip(sampled, accepted):
            if request.is_finished or (ok and not request.grammar.matcher.is_terminated()):
                continue
            if sched is not None:
                self.scheduler.take_out_of_step(request, sched)
            if ok:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            else:
                self.scheduler.fail_request(request, ValueError(f"the grammar rejected token {token}"))
            reported = reported if reported is not None else {id(r) for r, _, _ in updated}
            if id(request) not in reported:  # else its token's output, made after this, carries the finish
                updated.append((request, None, None))

    def wait_for_grammars(self, timeout: float) -> None:
        """Block until a compiling grammar is ready, or ``timeout`` seconds: when only such requests are left, a
        caller stepping in a loop would otherwise spin, taking the GIL from the compile threads."""
        pending = [request.grammar.compiled for request in self._compiling if not request.is_finished]
        if pending:
            futures.wait(pending, timeout=timeout, return_when=futures.FIRST_COMPLETED)

    def _poll_grammars(self) -> list[Request]:
        """Give ready grammars their matchers; fail the requests whose grammar did not compile."""
        failed, still = [], []
        for request in self._compiling:
            if request.is_finished:
                continue
            if not self.structured.poll(request.grammar):
                still.append(request)
            elif request.grammar.error is not None:
                self.scheduler.fail_request(request, ValueError(request.grammar.error))
                failed.append(request)
        self._compiling = still
        return failed

    def _build(self, sched: SchedulerOutput, failed: list[Request]) -> HostBatch | None:
        """The step's host arrays. If they cannot be built, the requests whose own arrays cannot be built are
        failed and taken out of the step (appended to ``failed``), and the rest goes on; a failure no single
        request explains is the engine's, and raised."""
        try:
            return build_host_batch(sched, self.config.block_size, self.vocab_size)
        except Exception:
            culprits = []
            for chunk in list(sched.chunks):
                try:
                    build_host_batch(SchedulerOutput([chunk], chunk.num_tokens), self.config.block_size,
                                     self.vocab_size)
                except Exception as exc:  # noqa: BLE001
                    culprits.append((chunk.request, exc))
            if not culprits:
                raise
        for request, exc in culprits:
            self.scheduler.fail_request(request, exc, sched)
            failed.append(request)
        return build_host_batch(sched, self.config.block_size, self.vocab_size) if not sched.is_empty else None

    @staticmethod
    def _output(request: Request, token: int | None, logprobs: dict[int, float] | None) -> EngineCoreOutput:
        if request.status is RequestStatus.FINISHED_ERROR:
            return EngineCoreOutput(request.request_id, [], "error", request.stop_reason)
        out = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[] if token is None else [token],
            finish_reason=request.status.value if request.is_finished else None,
            stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            logprobs=None if logprobs is None else [logprobs],
        )
        if not request.timings_sent:  # the first output: the front end times the request's phases from these
            out.timings = RequestTimings(request.queued_time, request.scheduled_time or request.queued_time)
            request.timings_sent = True
        if request.sampling_params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            out.prompt_logprobs = [None, *request.prompt_logprobs]
            request.prompt_logprobs_sent = True
        return out

    def _count(self, sched: SchedulerOutput, num_generated: int) -> None:
        stats = self.stats
        stats.num_steps += 1
        self.iteration_tokens.observe(sched.num_batched_tokens)
        stats.num_generated_tokens += num_generated
        stats.num_preemptions = self.scheduler.num_preemptions
        cache = self.kv.prefix_cache
        if cache is not None:
            stats.prefix_cache_queries, stats.prefix_cache_hits = cache.stats.query_tokens, cache.stats.hit_tokens
        for chunk in sched.chunks:
            if chunk.start < chunk.request.num_prompt_tokens:
                stats.num_prompt_tokens += min(chunk.num_tokens, chunk.request.num_prompt_tokens - chunk.start)

    def snapshot(self) -> CoreStats:
        """The state now, for a front end (counters are totals since start)."""
        cache, stats = self.kv.prefix_cache, self.stats
        idle = cache.num_evictable_pages if cache is not None else 0  # idle cached pages count as free, as in vLLM
        return CoreStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_kv_pages=self.kv.num_pages, num_used_pages=self.kv.allocator.num_used - idle,
            num_cached_pages=cache.num_cached_pages if cache is not None else 0,
            prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits,
            num_prompt_tokens=stats.num_prompt_tokens, num_generated_tokens=stats.num_generated_tokens,
            num_preemptions=stats.num_preemptions, num_steps=stats.num_steps,
            iteration_tokens_counts=tuple(self.iteration_tokens.counts),
            iteration_tokens_sum=int(self.iteration_tokens.sum), timestamp=time.time(),
        )

    def kv_usage(self) -> float:
        return self.kv.allocator.num_used / self.kv.num_pages
