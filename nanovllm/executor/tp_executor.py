"""Tensor parallelism on one host: the driver's model runner is rank 0, worker processes run ranks 1..N-1.

Each step the driver builds the step's host arrays (no Request objects) and broadcasts them; every rank stages
them, runs its shard of the model (linears all-reduce, the LM head all-gathers) and samples. Sampling is a pure
function of the logits and the seeds, so every rank ends the step with the same tokens, which the next step's
inputs may read on the device (overlap scheduling) without another broadcast. Only the driver copies results
back to the host.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import socket
from multiprocessing.connection import Connection
from typing import Any

import torch

from nanovllm.config import EngineConfig
from nanovllm.distributed.parallel_state import (
    broadcast_from_driver,
    init_tensor_parallel,
    shutdown_tensor_parallel,
)
from nanovllm.engine.scheduler import ModelOutput, SchedulerOutput
from nanovllm.executor.logprobs import PendingStep

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 600.0


def _free_port() -> int:
    """A port nobody listens on now, so two engines on one host never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _use_cuda(config: EngineConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def _worker_main(config: EngineConfig, model_path: str, rank: int, world_size: int, init_method: str,
                 conn: Connection) -> None:
    from nanovllm.executor.model_runner import ModelRunner

    try:
        use_cuda = _use_cuda(config)
        if use_cuda:
            torch.cuda.set_device(rank)
        init_tensor_parallel(rank, world_size, init_method, use_cuda)
        runner = ModelRunner(config, model_path)
        conn.send(("ready", runner.num_kv_blocks))
        while True:
            host = broadcast_from_driver(None)
            if host is None:  # the driver is shutting down
                break
            runner.launch_host(host, None)
    except Exception as exc:  # tell the driver why, instead of leaving it to wait
        try:
            conn.send(("error", f"rank {rank}: {exc!r}"))
        except OSError:
            pass
        raise
    finally:
        shutdown_tensor_parallel()


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        from nanovllm.executor.model_runner import ModelRunner

        world_size = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self.workers: list[mp.Process] = []
        self.conns: list[Connection] = []
        self._closed = False
        for rank in range(1, world_size):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, name=f"nanovllm-tp{rank}", daemon=True,
                                      args=(config, model_path, rank, world_size, init_method, child_end))
            process.start()
            child_end.close()
            self.workers.append(process)
            self.conns.append(parent_end)
        atexit.register(self.shutdown)
        try:
            use_cuda = _use_cuda(config)
            if use_cuda:
                torch.cuda.set_device(0)
            init_tensor_parallel(0, world_size, init_method, use_cuda)
            self.runner = ModelRunner(config, model_path)
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.device_type = self.runner.device_type
        logger.info("tensor parallel over %d ranks", world_size)

    def _wait_ready(self) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(_STARTUP_TIMEOUT_S):
                raise RuntimeError(f"tensor-parallel rank {rank} did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"tensor-parallel worker failed to start: {value}")

    def check_workers(self) -> None:
        """Raise if a worker has died, rather than wait on a collective it will never join."""
        for rank, process in enumerate(self.workers, start=1):
            if not process.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} died (exit code {process.exitcode})")

    def launch(self, sched: SchedulerOutput) -> PendingStep:
        self.check_workers()
        host = self.runner.build_host_batch(sched)
        broadcast_from_driver(host)
        return self.runner.launch_host(host, sched.sampled_chunks)

    def collect(self, pending: PendingStep) -> ModelOutput:
        return self.runner.collect(pending)

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        return self.collect(self.launch(sched))

    def take_wait_time(self) -> float:
        return self.runner.take_wait_time()

    def model_info(self) -> dict[str, Any]:
        return self.runner.model_info()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if all(p.is_alive() for p in self.workers) and hasattr(self, "runner"):
            try:
                broadcast_from_driver(None)
            except Exception:  # a worker died mid-way: the processes are ended below anyway
                pass
        for process in self.workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        shutdown_tensor_parallel()
