"""Tensor and pipeline parallelism: the driver's side. The driver is rank 0; it schedules and drives the others.

Start-up: check that the model splits over ``tp * pp`` ranks; host the rendezvous store (on a port the OS picks,
so engines never collide) and leave the engine config in it; spawn one worker per other rank (or, with
torchrun-style variables, find them started already, on any host); join the groups; build rank 0's runner. Each
rank sizes its KV pool and all take the smallest. All of it runs under the generous start-up timeout, and a worker
that dies on the way fails it at once: the driver waits for spawned workers by polling the store and their
processes, and enters a blocking rendezvous only when all are there. Once every rank is ready the step timeout
bounds the collectives.

A step: the driver builds the step's host arrays (flat numpy arrays and a few numbers, no Request objects) and
broadcasts them over the gloo control group as one pickled object: two small broadcasts, far below a GPU step, and
cheaper than one broadcast per array with its shape sent first. Then every rank runs its part of the forward; the
rank(s) holding the LM head sample (identically, as sampling is a pure function of logits and per-request seeds),
so the tokens that the next step reads on the device are everywhere they are needed without another broadcast.

Failure: a worker that dies closes its sockets, so the driver's next collective fails at once, and a watchdog
thread notices the exit even while the engine is idle; the error names the rank and its exit code or exception.
A hung worker ends in the step timeout. Shutdown (``shutdown()``, garbage collection or interpreter exit)
asks the workers to stop, then terminates any that do not.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from nanovllm.config import EngineConfig
from nanovllm.distributed.groups import (
    STARTUP_TIMEOUT_S,
    abort_nccl_groups,
    broadcast_from_driver,
    destroy_parallel,
    finish_startup,
    get_parallel_groups,
    host_store,
    init_parallel,
    join_store,
    publish_config,
    set_step_timeout,
    torchrun_env,
)
from nanovllm.executor.base import LaunchedStep, ModelOutput
from nanovllm.executor.input_batch import HostBatch
from nanovllm.executor.parallel_checks import check_devices, check_parallel_sizes
from nanovllm.layers.quantization import resolve_quant_config
from nanovllm.executor.worker import (
    JOINING_KEY,
    StepTimeout,
    cpu_threads_per_rank,
    make_runner,
    run_worker,
    uses_cuda,
)

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 10.0  # for workers to leave after the stop message, before they are terminated


class _Workers:
    """The spawned worker processes, their error pipes and a watchdog; nothing here refers to the executor, so a
    finalizer can stop them after the executor is gone."""

    def __init__(self) -> None:
        self.processes: dict[int, mp.Process] = {}
        self.errors: dict[int, Connection] = {}
        self.failure: str | None = None
        self.stopping = False
        self.groups_live = False
        self._lock = threading.Lock()  # the watchdog and the driver may both look at a dead worker
        self._described: dict[int, str] = {}
        self.saved_threads: int | None = None
        self.runner: Any = None  # the driver's, once built: its CUDA graphs must go before the groups

    def spawn(self, world_size: int, port: int) -> None:
        context = mp.get_context("spawn")  # fork would copy the driver's threads and CUDA state
        for rank in range(1, world_size):
            parent_end, child_end = context.Pipe(duplex=False)
            process = context.Process(
                target=run_worker, name=f"nanovllm-rank{rank}", daemon=True,
                args=(rank, rank, "127.0.0.1", port, world_size, child_end, logging.getLogger().getEffectiveLevel()),
            )
            process.start()
            child_end.close()
            self.processes[rank], self.errors[rank] = process, parent_end
        threading.Thread(target=self._watch, name="nanovllm-worker-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """Block until some worker exits; outside shutdown that is a failure worth reporting at once."""
        by_sentinel = {p.sentinel: rank for rank, p in self.processes.items()}
        ready = wait(list(by_sentinel))
        if self.stopping:
            return
        self.failure = self.describe_failure(by_sentinel[ready[0]])
        logger.error("parallel worker failed: %s", self.failure)
        groups = get_parallel_groups()
        if groups is not None and groups.backend == "nccl":
            abort_nccl_groups()  # NCCL waits on a dead peer until its timeout; this makes the pending op fail now

    def describe_failure(self, rank: int) -> str:
        with self._lock:
            if rank not in self._described:
                self._described[rank] = self._describe(rank)
            return self._described[rank]

    def _describe(self, rank: int) -> str:
        process = self.processes[rank]
        message = None
        try:
            if self.errors[rank].poll(0.5):  # a worker that raised sends why before it exits
                message = self.errors[rank].recv()
        except (EOFError, OSError):
            pass
        if message is not None:
            return f"rank {rank} failed: {message}"
        process.join(timeout=1.0)
        return f"rank {rank} died (exit code {process.exitcode})"

    def check(self, timeout: float = 0.0) -> str | None:
        """Why a worker is gone, if one is (waiting up to ``timeout`` for one that is on its way out)."""
        if self.failure is not None or not self.processes:
            return self.failure
        deadline = time.monotonic() + timeout
        while True:
            for rank, process in self.processes.items():
                if not process.is_alive() or self._has_news(rank):
                    self.failure = self.describe_failure(rank)
                    return self.failure
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _has_news(self, rank: int) -> bool:
        """The worker sent why it fails, or closed its end: it is on its way out (its exit may take a while)."""
        try:
            return self.errors[rank].poll()
        except OSError:  # closed by ``stop``
            return False

    def wait_joining(self, store: Any) -> None:
        """Wait until every spawned worker is about to join the groups, failing fast if one dies on the way (the
        groups' rendezvous does not look at the processes: it would wait out its whole timeout)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        keys = [JOINING_KEY.format(rank=rank) for rank in self.processes]
        while not store.check(keys):
            failure = self.check()
            if failure is not None:
                raise RuntimeError(f"a parallel worker failed to start: {failure}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"parallel workers did not start within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.groups_live and self.failure is None:
            # in a thread: a hung worker must not hang shutdown
            thread = threading.Thread(target=_send_stop, daemon=True)
            thread.start()
            thread.join(_STOP_TIMEOUT_S)
        # after a failure nobody waits for the stop message: end the rest now
        deadline = time.monotonic() + (_STOP_TIMEOUT_S if self.failure is None else 0.5)
        for process in self.processes.values():
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        for conn in self.errors.values():
            conn.close()
        if self.groups_live:
            self.groups_live = False
            destroy_parallel(self.runner.release_graphs if self.runner is not None else None)
        if self.saved_threads is not None:
            torch.set_num_threads(self.saved_threads)


def _send_stop() -> None:
    try:
        broadcast_from_driver(None)
    except Exception:  # a worker already gone: it is terminated next
        logger.debug("stop message not delivered", exc_info=True)


class ParallelExecutor:
    """The ``Executor`` over ``tp * pp`` ranks. Every rank that samples needs a step's grammar bitmask at launch,
    so the engine makes it before (``samples_later`` is False)."""

    samples_later = False

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
        world_size = tp_size * pp_size
        check_parallel_sizes(config.hf_config, tp_size, pp_size)
        resolve_quant_config(config.quantization, config.hf_config)  # a bad FP8 config fails before any worker starts
        use_cuda = uses_cuda(config)
        env = torchrun_env()
        self._workers = _Workers()
        self._finalizer = weakref.finalize(self, self._workers.stop)  # also runs at interpreter exit
        try:
            if env is None:
                check_devices(use_cuda, world_size)
                store = host_store(world_size)
                publish_config(store, (config, model_path))
                self._workers.spawn(world_size, store.port)
                self._workers.wait_joining(store)
                local_rank = 0
            else:
                store = self._join_launched(env, world_size)
                publish_config(store, (config, model_path))
                local_rank = env.local_rank
            if use_cuda:
                torch.cuda.set_device(local_rank)
            elif env is None:
                self._workers.saved_threads = torch.get_num_threads()
                torch.set_num_threads(cpu_threads_per_rank(world_size))
            self._workers.groups_live = True  # (also if joining fails half-way: leave what was joined)
            init_parallel(store, 0, tp_size, pp_size, use_cuda)
            self.runner = make_runner(config, model_path)
            self._workers.runner = self.runner
            finish_startup()
        except BaseException as exc:
            # the driver's error is most often a worker's failure seen from here (a closed connection): name it
            failure = self._workers.check(timeout=5.0)
            self.shutdown()
            if failure is not None and not isinstance(exc, ValueError):
                raise RuntimeError(f"a parallel worker failed to start: {failure}") from exc
            raise
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.device_type = self.runner.device_type
        self.num_micro_batches = pp_size  # the engine keeps one batch in flight per pipeline stage
        logger.info("parallel engine: %d ranks (tensor parallel %d x pipeline parallel %d), %s", world_size,
                    tp_size, pp_size, "spawned on this host" if env is None else "launched by the environment")

    @staticmethod
    def _join_launched(env: Any, world_size: int) -> Any:
        if env.world_size != world_size:
            raise ValueError(
                f"WORLD_SIZE={env.world_size} but tensor_parallel_size x pipeline_parallel_size = {world_size}; "
                "launch as many ranks as the engine uses"
            )
        if env.rank != 0:
            raise ValueError(f"RANK={env.rank}: only rank 0 builds the engine; run `python -m "
                             "nanovllm.entrypoints.worker` on the other ranks (see README, 'Multi-GPU and multi-host')")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent already hosts the store
            return join_store(env.master_addr, env.master_port, world_size)
        return host_store(world_size, env.master_addr, env.master_port)

    # ---- the executor interface ------------------------------------------------------------------------------

    def launch(self, batch: HostBatch) -> LaunchedStep:
        self._raise_if_failed()
        try:
            broadcast_from_driver(batch)
            return self.runner.launch(batch)
        except Exception as exc:
            raise self._failed(exc) from exc

    def sample(self, step: LaunchedStep, grammar_bitmask: Any) -> None:
        raise RuntimeError("tensor and pipeline ranks take a step's grammar bitmask at launch")

    def collect(self, step: LaunchedStep) -> ModelOutput:
        try:
            return self.runner.collect(step)
        except Exception as exc:
            raise self._failed(exc) from exc

    def take_wait_time(self) -> float:
        return self.runner.take_wait_time()

    def model_info(self) -> dict[str, Any]:
        return self.runner.model_info()  # rank 0's shard (and, with pipeline stages, its stage)

    def set_step_timeout(self, seconds: float) -> None:
        """Bound every rank's step collectives by ``seconds`` from now on (call it between steps). The default is
        ``NANOVLLM_DIST_TIMEOUT_S`` (600 s); tests shorten it once the engine is up, as start-up has its own."""
        if not seconds > 0:
            raise ValueError(f"the step timeout must be positive, got {seconds}")
        self._raise_if_failed()
        set_step_timeout(seconds)  # this rank first: where torch cannot change it, no worker is told to
        try:
            broadcast_from_driver(StepTimeout(seconds))
        except Exception as exc:
            raise self._failed(exc) from exc

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers.processes.values()]

    def shutdown(self) -> None:
        """Stop the workers and leave the groups; safe to call twice, and called at exit or collection anyway."""
        self._finalizer()

    # ---- failure ---------------------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._workers.stopping:
            raise RuntimeError(f"the parallel engine is shut down{self._reason()}")
        failure = self._workers.failure  # set by the watchdog, which waits on every worker's exit
        if failure is not None:
            self.shutdown()
            raise RuntimeError(f"the parallel engine failed: {failure}")

    def _failed(self, exc: Exception) -> RuntimeError:
        """A step failed on the driver: name the worker behind it if there is one, and stop the rest."""
        failure = self._workers.check(timeout=3.0)
        if failure is None:
            timed_out = "timed out" in str(exc).lower()
            groups = get_parallel_groups()
            timeout = f" within {groups.step_timeout_s:g} s" if groups is not None else ""
            failure = (f"no answer from the other ranks{timeout} (is one hung?)"
                       if timed_out else f"{type(exc).__name__}: {exc}")
            self._workers.failure = failure
        self.shutdown()
        return RuntimeError(f"the parallel engine failed: {failure}")

    def _reason(self) -> str:
        return f" ({self._workers.failure})" if self._workers.failure else ""
