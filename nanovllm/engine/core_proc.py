"""The engine core in its own process: the child side of the front-end <-> engine-core link.

The serving front end (tokenization, detokenization, HTTP) and the step loop would otherwise share one GIL, and every
millisecond the front end holds it is a millisecond the GPU waits. So the child owns the executor and the
``EngineCore`` and does nothing but drain its inbox, step and send back token outputs.

Link: two one-way ``multiprocessing`` pipes (no ports, no shared-memory names) carrying the typed messages of
``engine/messages.py``. A request's prompt crosses once, in ``AddRequests``; each step's ``CoreOutputs`` carries
only the new token of each request.

The child must not outlive the front end: it exits on EOF of its inbox (the parent's end closes when the parent
dies), on a failed send, when its parent pid changes, and (Linux) through PR_SET_PDEATHSIG.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine import messages as msg

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1  # how often a busy core attaches a stats snapshot to its outputs
_PARENT_CHECK_S = 1.0  # how often an idle core checks that its parent is alive
_PR_SET_PDEATHSIG = 1


def run_engine_core(
    config: EngineConfig,
    inbox: Connection,
    outbox: Connection,
    parent_pid: int,
    log_level: int,
    die_with_parent: bool,
) -> None:
    """Entry point of the engine-core process (a ``spawn`` target, so importable at module level)."""
    # ctrl-C reaches the whole process group; the front end decides when the core stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if die_with_parent:
        _set_parent_death_signal()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s")
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return
    try:
        core = _build_core(config)
    except BaseException as exc:  # noqa: BLE001 - anything here is a startup failure the parent must see
        logger.debug("engine core startup failed", exc_info=True)
        _try_send(outbox, msg.CoreFailed(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    _try_send(outbox, msg.CoreReady(core.num_kv_pages))
    try:
        _CoreLoop(core, inbox, outbox, parent_pid).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("front end is gone; engine core exits")
    except BaseException as exc:  # noqa: BLE001
        logger.exception("engine core failed")
        _try_send(outbox, msg.CoreFailed(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)


def _build_core(config: EngineConfig) -> Any:
    # imported here: these pull in torch and the model code, which only the child needs at this point
    from nanovllm.engine.engine_core import EngineCore
    from nanovllm.engine.model_files import load_tokenizer
    from nanovllm.executor import make_executor
    from nanovllm.loader import load_hf_config, resolve_model_path

    logger.info("engine core process %d started; loading the model", os.getpid())
    model_path = resolve_model_path(config.model, config.revision, weights=config.load_format != "dummy")
    if config.hf_config is None:
        config.finalize(load_hf_config(model_path, config.trust_remote_code))
    # the tokenizer loads only if a request asks for structured outputs (their grammars need the vocabulary)
    return EngineCore(config, make_executor(config, model_path), load_tokenizer=lambda: load_tokenizer(config, model_path))


class _CoreLoop:
    def __init__(self, core: Any, inbox: Connection, outbox: Connection, parent_pid: int) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self.stopping = False
        self.stats_dirty = True  # something changed since the last snapshot sent
        self.last_stats = 0.0

    def run(self) -> None:
        while not self.stopping:
            if not self.core.has_unfinished():
                if self.stats_dirty:  # idle: let the front end see the settled state (e.g. zero pages in use)
                    self._send_stats()
                self._wait_for_input(timeout=None)
            self._drain_inbox()
            if self.stopping or not self.core.has_unfinished():
                continue
            outputs = self.core.step()
            if self.core.is_stalled():
                self._wait_for_input(timeout=0.01)
                continue
            self.stats_dirty = True
            now = time.monotonic()
            stats = None
            if now - self.last_stats >= STATS_INTERVAL_S:
                stats, self.last_stats, self.stats_dirty = self.core.snapshot(), now, False
            if outputs or stats is not None:
                self.outbox.send(msg.CoreOutputs(outputs, stats, now))

    def _wait_for_input(self, timeout: float | None) -> None:
        """Block until a message arrives (or ``timeout``), checking now and then that the parent lives."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _PARENT_CHECK_S if deadline is None else max(0.0, min(_PARENT_CHECK_S, deadline - time.monotonic()))
            if self.inbox.poll(wait):
                return
            if os.getppid() != self.parent_pid:
                raise EOFError("parent process died")
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _drain_inbox(self) -> None:
        while not self.stopping and self.inbox.poll(0):
            self._handle(self.inbox.recv())

    def _handle(self, message: msg.ToCore) -> None:
        self.stats_dirty = True
        if isinstance(message, msg.AddRequests):
            for spec in message.requests:
                try:
                    self.core.add_request(spec)
                except Exception as exc:  # noqa: BLE001 - one bad request fails alone
                    self.outbox.send(msg.RequestFailed(spec.request_id, f"{type(exc).__name__}: {exc}"))
        elif isinstance(message, msg.AbortRequests):
            for request_id in message.request_ids:
                self.core.abort_request(request_id)
        elif isinstance(message, msg.FinishRequests):
            for stop in message.stops:
                self.core.finish_request(stop.request_id, stop.stop)
        elif isinstance(message, msg.QueryStats):
            self.outbox.send(msg.StatsReply(message.query_id, self.core.snapshot()))
        elif isinstance(message, msg.Shutdown):
            self.stopping = True
        else:
            logger.warning("engine core ignores an unknown message %r", message)

    def _send_stats(self) -> None:
        self.outbox.send(msg.CoreOutputs([], self.core.snapshot()))
        self.stats_dirty, self.last_stats = False, time.monotonic()


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGTERM this process when the thread that started it dies (a backstop for a SIGKILLed parent)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) is unavailable")


def _try_send(conn: Connection, message: msg.FromCore) -> None:
    try:
        conn.send(message)
    except OSError:
        pass
