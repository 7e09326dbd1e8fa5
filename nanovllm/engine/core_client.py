"""The front end's handle on the engine-core process: start it, talk to it, notice when it dies, stop it.

Two daemon threads keep the caller (an asyncio loop) from ever blocking on the pipes: a sender that writes queued
messages (a burst of long prompts can fill a pipe while the child is mid-step) and a reader that receives outputs
and hands them to a callback. The callback runs on the reader thread; ``AsyncLLM`` forwards it to its event loop.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from typing import Any, Callable

from nanovllm.config import EngineConfig
from nanovllm.engine.core_proc import run_engine_core
from nanovllm.engine import messages as msg
from nanovllm.engine.serving_stats import CoreStats

logger = logging.getLogger(__name__)

_STOP = object()  # tells the sender thread to exit


class EngineStartupError(RuntimeError):
    """The engine-core process could not start (bad model path, out of memory, ...); carries the child's message."""


class EngineDeadError(RuntimeError):
    """The engine-core process is gone, so no request can make progress."""


class EngineCoreClient:
    def __init__(
        self,
        config: EngineConfig,
        on_message: Callable[[msg.CoreOutputs | msg.RequestFailed], None],
        on_death: Callable[[str], None],
        startup_timeout_s: float | None = None,
    ) -> None:
        """Start the engine core and wait until it is ready (raises ``EngineStartupError`` with the child's message).

        ``on_message`` gets the core's outputs and request failures, and ``on_death`` the reason the child died
        unexpectedly; both run on the reader thread."""
        self._on_message = on_message
        self._on_death = on_death
        self._closing = False
        self.dead_reason: str | None = None
        self.latest_stats = CoreStats()
        self._fatal_message: str | None = None
        self._queries: dict[int, concurrent.futures.Future[CoreStats]] = {}
        self._query_ids = itertools.count()
        self._lock = threading.Lock()

        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and CUDA state
        child_inbox, self._outbox = ctx.Pipe(duplex=False)
        self._inbox, child_outbox = ctx.Pipe(duplex=False)
        # Not a daemon: a daemonic process may not start children, and the executor may start TP workers.
        # Cleanup is ours instead: shutdown() at exit, and the child's own parent-death checks.
        self._proc = ctx.Process(
            target=run_engine_core,
            args=(config, child_inbox, child_outbox, os.getpid(), logging.getLogger().getEffectiveLevel(),
                  threading.current_thread() is threading.main_thread()),
            name="nanovllm-engine-core",
        )
        started = time.monotonic()
        self._proc.start()
        # Drop our copies of the child's ends, so that its death reads as EOF here (and ours as EOF there).
        child_inbox.close()
        child_outbox.close()
        atexit.register(self.shutdown)
        try:
            info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.num_kv_pages: int = info.num_kv_pages
        self.latest_stats = CoreStats(num_kv_pages=self.num_kv_pages)
        self._send_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="nanovllm-core-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="nanovllm-core-reader", daemon=True)
        self._sender.start()
        self._reader.start()
        logger.info("engine core process %d is ready (%d KV pages) after %.2f s", self._proc.pid, self.num_kv_pages,
                    time.monotonic() - started)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and not self._closing and self._proc.is_alive()

    # ---- requests to the child --------------------------------------------------------------------------------

    def add_requests(self, requests: tuple[msg.EngineRequest, ...]) -> None:
        self._send(msg.AddRequests(requests))

    def abort(self, engine_request_ids: list[str]) -> None:
        if engine_request_ids:
            self._send(msg.AbortRequests(tuple(engine_request_ids)))

    def finish(self, stops: list[msg.StopString]) -> None:
        if stops:
            self._send(msg.FinishRequests(tuple(stops)))

    def query_stats(self) -> concurrent.futures.Future[CoreStats]:
        """A fresh snapshot, answered between two steps (``latest_stats`` may be up to 0.1 s old)."""
        future: concurrent.futures.Future[CoreStats] = concurrent.futures.Future()
        if not self.is_alive:
            future.set_exception(EngineDeadError(self.dead_reason or "the engine core is shut down"))
            return future
        with self._lock:
            query_id = next(self._query_ids)
            self._queries[query_id] = future
        self._send(msg.QueryStats(query_id))
        return future

    def _send(self, message: msg.ToCore) -> None:
        if self._closing or self.dead_reason is not None:
            return  # the requests concerned were (or are being) failed by the death handling
        self._send_queue.put(message)

    # ---- threads ----------------------------------------------------------------------------------------------

    def _wait_ready(self, timeout_s: float | None) -> msg.CoreReady:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            # a child that failed may have exited right after writing its message: read before judging liveness
            exited = not self._proc.is_alive()
            if self._inbox.poll(0 if exited else 0.2):
                try:
                    message = self._inbox.recv()
                except (EOFError, OSError):
                    message = None
                if isinstance(message, msg.CoreReady):
                    return message
                if isinstance(message, msg.CoreFailed):
                    self._proc.join(5)
                    raise EngineStartupError(f"the engine core failed to start: {message.message}")
                if message is not None:
                    continue
                exited = True  # EOF: the child's end is closed
            if exited:
                self._proc.join(5)
                raise EngineStartupError(
                    f"the engine core process exited (exit code {self._proc.exitcode}) before it was ready"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise EngineStartupError(f"the engine core was not ready within {timeout_s} s")

    def _send_loop(self) -> None:
        while True:
            message = self._send_queue.get()
            if message is _STOP:
                return
            try:
                self._outbox.send(message)
            except OSError:  # the child is gone; the reader thread reports it
                return

    def _read_loop(self) -> None:
        try:
            while True:
                message: msg.FromCore = self._inbox.recv()
                if isinstance(message, msg.CoreOutputs):
                    if message.stats is not None:
                        self.latest_stats = message.stats
                    if message.outputs:
                        self._on_message(message)
                elif isinstance(message, msg.StatsReply):
                    self.latest_stats = message.stats
                    with self._lock:
                        future = self._queries.pop(message.query_id, None)
                    if future is not None and not future.done():
                        future.set_result(message.stats)
                elif isinstance(message, msg.CoreFailed):
                    self._fatal_message = message.message
                elif isinstance(message, msg.RequestFailed):
                    self._on_message(message)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a bug in a callback must not leave requests hanging silently
            logger.exception("the engine-core reader thread failed")
        if self._closing:
            self._fail_queries("the engine core is shut down")
            return
        self._proc.join(2)
        reason = "the engine core process died"
        if self._fatal_message:
            reason += f": {self._fatal_message}"
        elif self._proc.exitcode is not None:
            reason += f" (exit code {self._proc.exitcode})"
        self.dead_reason = reason
        logger.error("%s", reason)
        self._fail_queries(reason)
        self._on_death(reason)

    def _fail_queries(self, reason: str) -> None:
        with self._lock:
            futures, self._queries = list(self._queries.values()), {}
        for future in futures:
            if not future.done():
                future.set_exception(EngineDeadError(reason))

    # ---- shutdown ---------------------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the child (politely, then by force) and the threads; safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.shutdown)
        sender = getattr(self, "_sender", None)
        if sender is not None:
            self._send_queue.put(msg.Shutdown())
            self._send_queue.put(_STOP)
            sender.join(1.0)
        else:  # still starting: no sender thread yet
            try:
                self._outbox.send(msg.Shutdown())
            except OSError:
                pass
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            logger.warning("engine core did not stop in %.0f s; terminating it", timeout_s)
            self._proc.terminate()
            self._proc.join(2.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2.0)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(1.0)
        self._outbox.close()
        self._inbox.close()
        self._fail_queries("the engine core is shut down")
