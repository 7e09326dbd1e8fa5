"""Continuous batching under a per-step token budget, with chunked prefill and recompute preemption.

Each step builds one mixed batch: running decodes first (one token each), then the rest of any partly prefilled
prompts, then new requests from the waiting queue, each prefill cut to whatever budget is left. When a running
request needs a page and none is free, the newest running request is preempted: its pages are released and it
goes back to the front of the queue, to be recomputed from its tokens (prompt and output so far) when pages free up.

With pipeline parallelism (``num_micro_batches`` > 1) several steps are in flight at once, one per stage, and they
must be disjoint: a request in a launched, uncollected micro-batch is skipped (and never preempted) until its
results are in, and each micro-batch takes about 1/num_micro_batches of the requests, so the next one has work.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from nanovllm.engine.kv_manager import KVCacheManager
from nanovllm.engine.request import PLACEHOLDER, Request, RequestStatus
from nanovllm.executor.base import ModelOutput

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token position computed in this step
    num_tokens: int
    sample: bool  # the chunk reaches the end of the request's tokens, so its last row's logits are sampled
    output_index: int = -1  # where the sampled token goes in request.token_ids (its placeholder)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): copy-on-write before the forward

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def sampled_chunks(self) -> list[ScheduledChunk]:
        return [chunk for chunk in self.chunks if chunk.sample]


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
        num_micro_batches: int = 1,
    ) -> None:
        self.kv = kv
        self.num_micro_batches = num_micro_batches
        self._waiting_for_room = False
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is the first to preempt
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- scheduling -------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        max_seqs = self._micro_batch_size()
        self._waiting_for_room = False  # set when a request waits for pages held by steps in flight

        # Decodes before unfinished prefills, each group in admission order.
        for request in sorted(self.running, key=lambda r: r.num_pending_tokens > 1):
            budget = self.max_num_batched_tokens - out.num_batched_tokens
            if budget == 0 or len(out.chunks) >= max_seqs:
                break
            if request.status != RequestStatus.RUNNING or request.in_flight:  # preempted, or in another micro-batch
                continue
            if self._reached_limit(request):  # its last token is still on the way back (overlap)
                continue
            num_tokens = min(request.num_pending_tokens, budget)
            if self._make_room(request, num_tokens, out):
                self._schedule_chunk(request, num_tokens, out)

        # New (or preempted) requests, only when nothing had to be preempted or wait for room: there is no room to
        # grow, and the pages that free up belong to the requests already running.
        if not out.preempted and not self._waiting_for_room:
            self._admit(out, max_seqs)

        if self.num_micro_batches > 1:
            for chunk in out.chunks:
                chunk.request.in_flight = True
        out.page_copies = self.kv.take_page_copies()
        return out

    def _micro_batch_size(self) -> int:
        """Most requests one step may take: all of them, or with micro-batches an even share of those that could
        run, so that every stage of the pipeline gets a batch."""
        if self.num_micro_batches == 1:
            return self.max_num_seqs
        runnable = min(len(self.running) + len(self.waiting), self.max_num_seqs)
        return max(1, -(-runnable // self.num_micro_batches))

    def _admit(self, out: SchedulerOutput, max_seqs: int) -> None:
        """Start waiting requests in arrival order while the budget, the sequence limit and the pool allow.

        With the prefix cache on, a prompt whose first page matches a prompt being prefilled right now, and is not
        cached yet, waits a step, so it can reuse that prefill's pages instead of computing the same KV alongside
        it. Once the first page is cached, requests are admitted and match whatever has been computed so far."""
        prefilling = self._prefilling_first_pages()
        for request in list(self.waiting):
            budget = self.max_num_batched_tokens - out.num_batched_tokens
            if budget == 0 or len(self.running) >= self.max_num_seqs or len(out.chunks) >= max_seqs:
                break
            if request.grammar is not None and request.grammar.matcher is None:
                continue  # its grammar is still compiling
            first_page = self._first_page(request)
            if first_page is not None and first_page in prefilling and not self.kv.is_cached(first_page):
                continue
            if not request.page_table:
                self.kv.match_prefix(request)
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = request.num_computed_tokens
            num_tokens = min(request.num_pending_tokens, budget)
            if not self.kv.allocate(request, request.num_computed_tokens + num_tokens):
                self.kv.free(request)
                request.num_computed_tokens = 0
                break
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            self.running.append(request)
            if first_page is not None and request.num_computed_tokens + self.kv.page_size < request.num_prompt_tokens:
                prefilling.add(first_page)  # it computes at least one full page others could reuse
            self._schedule_chunk(request, num_tokens, out)

    def _first_page(self, request: Request) -> tuple[int, ...] | None:
        """The request's first page of prompt tokens, when prefix sharing could apply to it."""
        size = self.kv.page_size
        if self.kv.prefix_cache is None or request.num_prompt_tokens <= size:
            return None
        return tuple(request.prompt_token_ids[:size])

    def _prefilling_first_pages(self) -> set[tuple[int, ...]]:
        if self.kv.prefix_cache is None:
            return set()
        return {
            page for r in self.running
            if r.num_computed_tokens < r.num_prompt_tokens and (page := self._first_page(r)) is not None
        }  # (running requests still short of their prompt: their next chunk is being computed)

    def _reached_limit(self, request: Request) -> bool:
        """Whether the tokens it has, placeholders included, already end it by length."""
        return request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len

    def _make_room(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate pages for the chunk, preempting the newest running requests until it fits.

        Older requests are never preempted for newer ones, so the oldest always progresses. A request in a micro-batch
        still in flight is never a victim (its step is writing its pages). When the newest request that could be one
        is this request itself and others are in flight, it keeps its pages and waits for them instead of preempting
        itself: two requests that cannot fit together would otherwise take turns undoing each other's prefill.
        Returns False when the request is not scheduled."""
        while not self.kv.allocate(request, request.num_computed_tokens + num_tokens):
            victim = next((r for r in reversed(self.running) if not r.in_flight), None)
            if victim is None or (victim is request and any(r.in_flight for r in self.running)):
                self._waiting_for_room = True
                return False
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _schedule_chunk(self, request: Request, num_tokens: int, out: SchedulerOutput) -> None:
        start = request.num_computed_tokens
        request.num_computed_tokens += num_tokens
        chunk = ScheduledChunk(request, start, num_tokens, sample=request.num_computed_tokens == request.num_tokens)
        if chunk.sample:
            chunk.output_index = request.num_tokens
            request.token_ids.append(PLACEHOLDER)
        out.chunks.append(chunk)
        out.num_batched_tokens += num_tokens

    @staticmethod
    def _unschedule(request: Request, out: SchedulerOutput) -> bool:
        """Take back ``request``'s chunk of a step not yet launched: nothing of it will be computed (so its pages
        must not reach the prefix cache), and its sample slot goes. Whether it had one."""
        index = next((i for i, chunk in enumerate(out.chunks) if chunk.request is request), None)
        if index is None:
            return False
        chunk = out.chunks.pop(index)
        out.num_batched_tokens -= chunk.num_tokens
        request.num_computed_tokens = chunk.start
        if chunk.sample and request.token_ids and request.token_ids[-1] == PLACEHOLDER:
            request.token_ids.pop()
        return True

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self._unschedule(request, out)  # already scheduled in this step: take its chunk back
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        if not request.prompt_logprobs_sent:  # they will be computed again with the prompt
            request.prompt_logprobs.clear()
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    # ---- results ----------------------------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, result: ModelOutput) -> list[tuple[Request, int, dict | None]]:
        """Fill in each sampled token, check the stop conditions and release finished requests.

        Returns (request, token, its logprobs) for every request that got a token this step. A request whose update
        fails is failed alone (``FINISHED_ERROR``), and listed with token -1."""
        updated: list[tuple[Request, int, dict | None]] = []
        sampled = iter(range(len(result.token_ids)))
        for chunk in out.chunks:
            request = chunk.request
            request.in_flight = False
            row = next(sampled) if chunk.sample else None
            if request.is_finished:  # aborted, or stopped while this step ran
                continue
            try:
                token = self._update_one(chunk, result, row)
            except Exception as exc:  # noqa: BLE001 - a fault tied to one request must not stop the others
                self.fail_request(request, exc)
                updated.append((request, -1, None))
                continue
            if token is not None:
                updated.append((request, token, result.logprobs[row] if result.logprobs and row is not None else None))
        return updated

    def _update_one(self, chunk: ScheduledChunk, result: ModelOutput, row: int | None) -> int | None:
        request = chunk.request
        if request.request_id in result.prompt_logprobs and not request.prompt_logprobs_sent:
            request.prompt_logprobs.extend(result.prompt_logprobs[request.request_id])
        if chunk.start < request.num_prompt_tokens:
            self.kv.cache_computed(request, chunk.start + chunk.num_tokens)
        if row is None:
            return None
        token = result.token_ids[row]
        request.token_ids[chunk.output_index] = token
        status = self._stop_status(request, token, chunk.output_index)
        if status is not None:
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
        return token

    def fail_request(self, request: Request, error: BaseException, sched: SchedulerOutput | None = None) -> None:
        """End one request with ``FINISHED_ERROR`` (its pages freed); with ``sched``, also take its chunk out of that
        step, which must not have been launched yet."""
        logger.error("request %s failed: %s: %s", request.request_id, type(error).__name__, error,
                     exc_info=(type(error), error, error.__traceback__))
        if sched is not None:
            self.take_out_of_step(request, sched)
        if request.request_id in self.requests:
            self.finish_request(request.request_id, RequestStatus.FINISHED_ERROR,
                                f"{type(error).__name__}: {error}")

    @staticmethod
    def take_out_of_step(request: Request, sched: SchedulerOutput) -> bool:
        """Remove ``request``'s chunk from a step that has not been launched (before the request ends, so that the
        step neither writes into its freed pages nor copies into them); whether it had one."""
        if not Scheduler._unschedule(request, sched):
            return False
        doomed = set(request.page_table)
        sched.page_copies = [(src, dst) for src, dst in sched.page_copies if dst not in doomed]
        request.in_flight = False
        return True

    def _stop_status(self, request: Request, token: int, index: int) -> RequestStatus | None:
        params = request.sampling_params
        num_output = index + 1 - request.num_prompt_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_output >= request.max_tokens or index + 1 >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """End a running request from outside (a stop string found by the detokenizer)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.stop_reason = stop_reason
        self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        while request.token_ids and request.token_ids[-1] == PLACEHOLDER:  # a step scheduled past the end
            request.token_ids.pop()
        if request.page_table:
            self.kv.free(request)
        del self.requests[request.request_id]
