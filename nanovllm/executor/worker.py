"""A worker rank: joins the driver's group, builds its shard of the model, then runs every step the driver sends.

Started two ways:

- spawned by ``ParallelExecutor`` on the driver's host (``run_worker`` is the process target);
- by hand or by torchrun on any host (``python -m nanovllm.entrypoints.worker``, which calls ``run_worker``).
  The engine config comes from rank 0, so a worker needs no arguments.

A worker does no scheduling and sees no Request objects: each step it receives the step's host arrays, runs its
stage's forward (sampling too, where it holds the LM head) and waits for the next. ``None`` ends the loop; a
``StepTimeout`` between steps changes the step timeout.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from nanovllm.config import EngineConfig
from nanovllm.distributed.groups import (
    broadcast_from_driver,
    destroy_parallel,
    finish_startup,
    init_parallel,
    join_store,
    read_config,
    set_step_timeout,
)

logger = logging.getLogger(__name__)

# Set by a spawned worker once it is about to join the groups (the driver watches for it): the driver enters the
# groups' rendezvous, which waits without looking at the workers, only when every worker is at that point.
JOINING_KEY = "nanovllm/joining/{rank}"


@dataclass(frozen=True)
class StepTimeout:
    """The driver's message between steps: every rank bounds its step collectives by ``seconds`` from now on."""

    seconds: float


def uses_cuda(config: EngineConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def cpu_threads_per_rank(world_size: int) -> int:
    """CPU ranks on one host share its cores; more threads than cores makes every rank slower."""
    return max(1, (os.cpu_count() or 1) // world_size)


def make_runner(config: EngineConfig, model_path: str) -> Any:
    if config.pipeline_parallel_size > 1:
        from nanovllm.executor.pipeline import PipelineStageRunner

        return PipelineStageRunner(config, model_path)
    from nanovllm.executor.model_runner import ModelRunner

    return ModelRunner(config, model_path)


def run_worker(rank: int, local_rank: int, master_addr: str, master_port: int, world_size: int,
               errors: Connection | None = None, log_level: int = logging.WARNING) -> None:
    """The whole life of a worker rank. ``errors``: where a spawned worker reports why it failed."""
    if errors is not None:  # spawned: go when the driver goes, even if it is killed
        logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
        _die_with_parent()
    runner = None
    try:
        store = join_store(master_addr, master_port, world_size)
        config, model_path = read_config(store)
        use_cuda = uses_cuda(config)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        elif errors is not None:
            torch.set_num_threads(cpu_threads_per_rank(world_size))
        if not os.path.isdir(model_path):  # another host: its own copy of the checkpoint or hub cache
            from nanovllm.loader import resolve_model_path

            model_path = resolve_model_path(config.model, config.revision, weights=config.load_format != "dummy")
        store.set(JOINING_KEY.format(rank=rank), "1")
        init_parallel(store, rank, config.tensor_parallel_size, config.pipeline_parallel_size, use_cuda)
        runner = make_runner(config, model_path)
        finish_startup()
        logger.info("rank %d is ready", rank)
        steps = _receive_steps_in_background()
        while True:
            host = steps.get()
            if isinstance(host, BaseException):
                raise host
            if host is None:  # the driver shuts down
                break
            if isinstance(host, StepTimeout):
                set_step_timeout(host.seconds)
                continue
            runner.launch(host, copy_results=False)
    except Exception as exc:  # the driver sees the lost connection; this says why
        logger.error("rank %d failed: %r", rank, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        if errors is not None:
            try:
                errors.send(f"{type(exc).__name__}: {exc}")
            except OSError:
                pass
        sys.exit(1)
    finally:
        destroy_parallel(runner.release_graphs if runner is not None else None)
    logger.info("rank %d stopped", rank)


def _receive_steps_in_background() -> queue.Queue:
    """Take the driver's step broadcasts on a thread of their own, queued in order.

    A broadcast completes only when every rank has taken part. With pipeline micro-batches the driver announces the
    next step while a later stage is still running an earlier one; if that rank took part only between steps, the
    driver would wait for it and the stages would run one after another instead of at once."""
    steps: queue.Queue = queue.Queue()

    def receive() -> None:
        while True:
            try:
                host = broadcast_from_driver(None)
            except BaseException as exc:  # the driver is gone: the main loop raises it
                steps.put(exc)
                return
            steps.put(host)
            if host is None:
                return

    threading.Thread(target=receive, name="nanovllm-step-receiver", daemon=True).start()
    return steps


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, however the parent died."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # elsewhere the closed connection to the driver ends the worker at its next step
