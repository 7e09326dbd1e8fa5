"""``AsyncLLM``: the asyncio streaming front end, with the engine core in a child process.

Nothing heavy runs on the event loop, so one large request never stalls the others or ``/health``:
- intake (tokenization, chat templates, validation: ``InputProcessor``) runs on a small thread pool;
- output processing (incremental detokenization, stop strings: ``OutputProcessor``) runs on the core client's reader
  thread as each step's outputs arrive, under a lock shared with the loop's registrations and aborts;
- the loop only hands finished deltas to each request's stream (``call_soon_threadsafe``).
The engine core (child process, see ``core_proc``) schedules and runs batches.

A request whose consumer stops early (``break``, task cancelled, client gone) is aborted in the ``finally`` of its
stream, which frees its pages in the core.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, TypeVar

from nanovllm.config import EngineConfig
from nanovllm.engine.core_client import EngineCoreClient, EngineDeadError, EngineStartupError
from nanovllm.engine.input_processor import InputProcessor, Prompt
from nanovllm.engine.messages import CoreOutputs, RequestFailed
from nanovllm.engine.model_files import prepare_model_files
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.serving_stats import CoreStats, FrontendStats
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineStartupError", "RequestFailedError", "RequestStream"]

_INTAKE_THREADS = 4
T = TypeVar("T")


class RequestFailedError(RuntimeError):
    """The engine failed this request (and only this one); the message says why."""


class RequestStream:
    """Outputs (or one exception) waiting for a request's consumer; consecutive deltas are merged on read."""

    def __init__(self, request_id: str, merge: bool) -> None:
        self.request_id = request_id
        self._merge = merge
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        # a slow consumer gets one merged delta instead of a backlog of one-token deltas
        while self._merge and self._items and isinstance(self._items[0], RequestOutput):
            item = merge_delta(item, self._items.popleft())  # type: ignore[arg-type]
        return item


def merge_delta(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """Fold two consecutive delta outputs of one request into one (``first`` is reused)."""
    by_index = {c.index: c for c in first.outputs}
    for c in second.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        prev.text += c.text
        prev.token_ids = prev.token_ids + c.token_ids
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
        prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    first.outputs = [by_index[i] for i in sorted(by_index)]
    first.finished = second.finished
    first.num_cached_tokens = second.num_cached_tokens
    first.metrics = second.metrics
    if first.prompt_logprobs is None:
        first.prompt_logprobs = second.prompt_logprobs
    return first


class AsyncLLM:
    def __init__(self, config: EngineConfig, startup_timeout_s: float | None = None) -> None:
        # only configs and tokenizer files here; the child fetches and loads the weights
        files = prepare_model_files(config, weights=False)
        self.config = config
        self.model_path = files.model_path
        self.tokenizer = files.tokenizer
        self.output_processor = OutputProcessor(self.tokenizer, always_incremental=True)
        self.stats = FrontendStats()
        self._lock = threading.Lock()  # the output processor and stats: the loop and the reader thread share them
        self._intake = ThreadPoolExecutor(_INTAKE_THREADS, thread_name_prefix="nanovllm-intake")
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._dead_reason: str | None = None
        self.core = EngineCoreClient(config, self._on_core_message, self._on_core_death, startup_timeout_s)
        self.input_processor = InputProcessor(config, self.tokenizer, files.eos_token_ids, self.core.num_kv_pages)

    @classmethod
    def from_engine_args(cls, model: str, **engine_args: Any) -> "AsyncLLM":
        return cls(EngineConfig.from_kwargs(model, **engine_args))

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len  # type: ignore[return-value]

    @property
    def vocab_size(self) -> int:
        return self.input_processor.vocab_size

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    async def run_in_intake(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work (tokenize, detokenize, chat templates) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._intake, fn, *args)

    # ---- requests ---------------------------------------------------------------------------------------------

    async def add_request(
        self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None, stream: bool = True
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request (``ValueError`` before anything is queued), then iterate its outputs.

        With ``stream`` each output holds only what is new (text delta, new token ids and logprobs); without it the
        one output is the finished request. Must be awaited on the event loop that consumes the outputs."""
        self._check_healthy()
        self._bind_loop()
        params = params if params is not None else SamplingParams()
        request_id = request_id if request_id is not None else f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = await self.run_in_intake(self.input_processor.process, request_id, prompt, params)
        self._check_healthy()
        if request_id in self._streams:  # taken while this one was being tokenized
            raise ValueError(f"request_id {request_id!r} is already in use")
        with self._lock:
            self.output_processor.add_request(request, stream)
            self.stats.on_added(request.engine_requests)
        stream_state = RequestStream(request_id, merge=stream)
        self._streams[request_id] = stream_state
        self.core.add_requests(request.engine_requests)
        return self._iterate(stream_state)

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """``async for out in engine.generate(...)``: delta outputs as tokens arrive (see ``add_request``)."""
        outputs = await self.add_request(request_id, prompt, sampling_params, stream)
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    async def _iterate(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
                if not finished:  # consumer gone early: cancelled, broke out, or failed
                    self._abort_now(stream.request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; its consumer gets a last output with finish_reason "abort"."""
        self.abort_request(request_id)

    def abort_request(self, request_id: str) -> None:
        """``abort`` for synchronous code on the event loop's thread."""
        stream = self._streams.pop(request_id, None)
        with self._lock:
            state = self.output_processor.states.get(request_id)
            if stream is not None and state is not None:
                unfinished = [c.output for c in state.completions if not c.output.finished()]
                stream.put(RequestOutput(
                    request_id=request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
                    outputs=[CompletionOutput(c.index, "", [], "abort") for c in unfinished], finished=True,
                ))
        self._abort_now(request_id)

    def abort_all(self, error: BaseException) -> None:
        """Fail every in-flight request with ``error`` (e.g. a server that stops waiting at shutdown)."""
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self._abort_now(request_id)
        self._streams.clear()

    def _abort_now(self, request_id: str, reason: str = "abort") -> None:
        with self._lock:
            children = self.output_processor.abort_request(request_id)
            for child in children:
                self.stats.on_removed(child, reason)
        self.core.abort(children)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._streams and self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("AsyncLLM has requests in flight on another event loop; use one loop at a time")
        for request_id in list(self._streams):  # left over from a loop that is gone
            self._abort_now(request_id)
        self._streams.clear()
        self._loop = loop

    # ---- messages from the core (on the reader thread) --------------------------------------------------------

    def _on_core_message(self, message: CoreOutputs | RequestFailed) -> None:
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            if isinstance(message, CoreOutputs):
                self.stats.on_outputs(message.outputs, message.timestamp)
                processed = self.output_processor.process(message.outputs)
                for stop in processed.stops:
                    self.stats.on_removed(stop.request_id, "stop")
                deliveries = [(out, _error_of(out)) for out in processed.outputs]
                stops, aborts = processed.stops, processed.aborts
                for child in aborts:
                    self.stats.on_removed(child)
            else:
                parent = self.output_processor.child_to_parent.get(message.request_id)
                deliveries, stops, aborts = [], [], []
                if parent is not None:
                    deliveries = [(parent[0], ValueError(message.message))]
        self.core.finish(stops)  # stop strings found here: the core must stop those requests and free their pages
        self.core.abort(aborts)
        if deliveries:
            try:
                loop.call_soon_threadsafe(self._deliver, deliveries)
            except RuntimeError:  # the loop was closed meanwhile; nobody waits for these outputs
                pass

    def _deliver(self, deliveries: list[tuple[RequestOutput | str, BaseException | None]]) -> None:
        """On the loop: hand outputs to their streams; a failed request's stream gets its error instead."""
        for item, error in deliveries:
            request_id = item if isinstance(item, str) else item.request_id
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if error is not None:
                del self._streams[request_id]
                self._abort_now(request_id, "error")
                stream.put(error)
                continue
            stream.put(item)  # type: ignore[arg-type]
            if item.finished:  # type: ignore[union-attr]
                del self._streams[request_id]

    def _on_core_death(self, reason: str) -> None:
        self._dead_reason = reason
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.abort_all, EngineDeadError(reason))
            except RuntimeError:
                pass

    # ---- health, stats, shutdown ------------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._dead_reason is None and self.core.is_alive

    def _check_healthy(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(self._dead_reason or self.core.dead_reason or "the engine is shut down")

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine core cannot serve requests."""
        self._check_healthy()

    async def get_core_stats(self, timeout_s: float = 1.0) -> CoreStats:
        """A fresh snapshot from the core; the last one received if it does not answer in time."""
        if self.is_healthy:
            try:
                return await asyncio.wait_for(asyncio.wrap_future(self.core.query_stats()), timeout_s)
            except (asyncio.TimeoutError, EngineDeadError):
                pass
        return replace(self.core.latest_stats)

    def shutdown(self) -> None:
        """Fail in-flight requests and stop the engine-core process (idempotent)."""
        if self._dead_reason is None:
            self._dead_reason = "the engine is shut down"
        error = EngineDeadError(self._dead_reason)
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and loop is running:
            self.abort_all(error)
        elif loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.abort_all, error)
            except RuntimeError:
                pass
        self.core.shutdown()
        self._intake.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _error_of(out: RequestOutput) -> RequestFailedError | None:
    failed = [c for c in out.outputs if c.finish_reason == "error"]
    return RequestFailedError(f"the engine failed this request: {failed[0].stop_reason}") if failed else None
