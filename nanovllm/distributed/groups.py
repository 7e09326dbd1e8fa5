"""The process groups of one parallel engine: who is who among ``tp * pp`` ranks, and how they meet.

Ranks are laid out stage-major: rank = stage * tp_size + tp_rank, so the tensor-parallel group of a pipeline stage
is a run of consecutive ranks (on one host when a host holds a whole stage), and a rank's peer in another stage has
the same tp_rank. Three kinds of group:

- the default (world) group: NCCL on CUDA, gloo on CPU; pipeline sends and receives go over it;
- one tensor-parallel group per stage (the world itself when there is one stage); layers read it through
  ``parallel_state``;
- a gloo "control" group over all ranks, for step metadata (small pickled objects) and start-up agreement. It never
  touches a GPU stream. Timeouts are per rank: a worker waits on it whenever the engine is idle, which may be hours,
  so its timeout is long; the driver's is the step timeout, so a hung worker ends in an error. A peer that dies
  breaks the group at once either way (its sockets close).

Two timeouts bound the collectives. Start-up (the rendezvous, creating the groups, every rank loading its weights
and sizing its KV pool) runs under the generous start-up timeout: ranks wait there for the slowest one to load, and
on a busy machine starting a process and importing torch alone takes seconds. When every rank is ready
(``finish_startup``), each tightens its groups to the step timeout, past which a collective means a hung rank.
``NANOVLLM_DIST_STARTUP_TIMEOUT_S`` and ``NANOVLLM_DIST_TIMEOUT_S`` set them; ``set_step_timeout`` changes the
step timeout of a running engine's groups.

The rendezvous is a ``TCPStore`` hosted by rank 0: on a port the OS picks (spawned workers on one host, so two
engines never collide) or at ``MASTER_ADDR:MASTER_PORT`` (torchrun-style launch across hosts). Rank 0 also leaves
the engine config in the store for the workers to read.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from nanovllm.distributed.parallel_state import set_tp_group

logger = logging.getLogger(__name__)

# A step's collectives: short enough that a hung rank ends in an error. A dead rank errors at once.
STEP_TIMEOUT_S = float(os.environ.get("NANOVLLM_DIST_TIMEOUT_S", "600"))
# Start-up: long enough for the slowest rank to load its weights before the others go on (start-up is where ranks
# drift apart most); by default never shorter than a step's.
STARTUP_TIMEOUT_S = float(os.environ.get("NANOVLLM_DIST_STARTUP_TIMEOUT_S", max(600.0, STEP_TIMEOUT_S)))
_NCCL_ABORT_TIMEOUT_S = 10.0
_IDLE_TIMEOUT = timedelta(days=30)
_CONFIG_KEY = "nanovllm/engine_config"


@dataclass
class TorchrunEnv:
    """``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as torchrun sets them."""

    master_addr: str
    master_port: int
    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """The launcher's variables when they describe more than one rank; None means: start workers ourselves."""
    env = os.environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return None
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if name not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but {missing} are not; set all of MASTER_ADDR, "
                         "MASTER_PORT, RANK, WORLD_SIZE (and LOCAL_RANK) or none of them")
    rank = int(env["RANK"])
    return TorchrunEnv(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank, int(env["WORLD_SIZE"]),
                       int(env.get("LOCAL_RANK", rank)))


@dataclass
class ParallelGroups:
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    control: Any  # dist.ProcessGroup (gloo)
    backend: str
    # this rank's groups whose collectives a step waits on (the world, its TP group, and on rank 0 the control
    # group); tightened to the step timeout after start-up
    step_groups: list[Any] = field(default_factory=list)
    step_timeout_s: float = STARTUP_TIMEOUT_S  # what bounds them now

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def peer_in_stage(self, stage: int) -> int:
        """The rank of stage ``stage`` that holds the same tensor-parallel shard as this one."""
        return stage * self.tp_size + self.tp_rank


_GROUPS: ParallelGroups | None = None


def get_parallel_groups() -> ParallelGroups | None:
    return _GROUPS


def host_store(world_size: int, addr: str = "127.0.0.1", port: int = 0) -> dist.TCPStore:
    """Rank 0's side of the rendezvous; ``port=0`` lets the OS pick a free port (read it from ``store.port``)."""
    return dist.TCPStore(addr, port, world_size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=STARTUP_TIMEOUT_S))


def join_store(addr: str, port: int, world_size: int) -> dist.TCPStore:
    """A worker's side: retries until rank 0 listens (on another host it may start later) or the timeout."""
    return dist.TCPStore(addr, port, world_size, is_master=False, timeout=timedelta(seconds=STARTUP_TIMEOUT_S))


def publish_config(store: dist.TCPStore, payload: Any) -> None:
    store.set(_CONFIG_KEY, pickle.dumps(payload))


def read_config(store: dist.TCPStore) -> Any:
    return pickle.loads(store.get(_CONFIG_KEY))  # blocks until rank 0 has published it


def init_parallel(store: dist.TCPStore, rank: int, tp_size: int, pp_size: int, use_cuda: bool) -> ParallelGroups:
    """Every rank calls this with the same sizes; returns this rank's view and sets the layers' TP group."""
    global _GROUPS
    if _GROUPS is not None or dist.is_initialized():
        raise RuntimeError("this process already belongs to a parallel engine; shut that engine down first")
    world_size = tp_size * pp_size
    backend = "nccl" if use_cuda else "gloo"
    startup = timedelta(seconds=STARTUP_TIMEOUT_S)
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=startup)
    except BaseException:
        _forget_failed_world()
        raise
    # a timeout is each rank's own: workers may wait for the next step for ever, the driver may not wait on them
    control = dist.new_group(backend="gloo", timeout=startup if rank == 0 else _IDLE_TIMEOUT)
    groups = ParallelGroups(rank, world_size, tp_size, pp_size, control, backend)
    groups.step_groups.append(dist.group.WORLD)
    if rank == 0:
        groups.step_groups.append(control)
    tp_group = dist.group.WORLD
    if pp_size > 1 and tp_size > 1:  # every rank must create every group, in the same order
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)), timeout=startup)
            if stage == groups.pp_rank:
                tp_group = group
                groups.step_groups.append(group)
    set_tp_group(tp_group if tp_size > 1 else None, groups.tp_rank, tp_size)
    _GROUPS = groups
    logger.debug("rank %d of %d joined (stage %d, tp rank %d, %s)", rank, world_size, groups.pp_rank,
                 groups.tp_rank, backend)
    return groups


def _forget_failed_world() -> None:
    """After a failed ``init_process_group``, let the next engine in this process name its groups as a fresh
    process does.

    torch names the groups by a per-process counter, which the rendezvous keys carry; a failed initialization has
    counted its world group, and only destroying an initialized world resets the counter. The next engine's driver
    would then wait for keys its fresh workers never write, for the whole start-up timeout. The counter is private;
    it is reset only when no group exists, and where it is not found the next engine may fail to start as before."""
    if dist.is_initialized():
        return
    try:
        from torch.distributed.distributed_c10d import _world

        _world.group_count = 0
    except Exception:
        logger.debug("could not reset torch's process group counter", exc_info=True)


def finish_startup() -> None:
    """Every rank calls this once its runner is built: it waits until all are (under the start-up timeout, as the
    slowest rank may still be loading its weights), then bounds this rank's step collectives by the step timeout.

    Without this meeting a rank that builds its runner quickly would start its first step while another still
    loads, and the step's collectives would have to wait out that loading."""
    groups = _GROUPS
    if groups is None:
        return
    dist.barrier(group=groups.control)
    try:
        set_step_timeout(STEP_TIMEOUT_S)
    except RuntimeError as exc:  # the engine still runs, only a hung rank is found later
        logger.warning("%s; a hung rank is noticed after %.0f s", exc, groups.step_timeout_s)


def set_step_timeout(seconds: float) -> None:
    """Bound this rank's step collectives by ``seconds`` from now on (each rank sets its own; a running engine's
    executor sets every rank's). Raises ``RuntimeError`` if this torch cannot change a group's timeout."""
    groups = _GROUPS
    if groups is None:
        raise RuntimeError("this process is in no parallel engine")
    if not seconds > 0:
        raise ValueError(f"the step timeout must be positive, got {seconds}")
    try:
        # Private, but the one way to change a live group's timeout (it sets the backend's default for the
        # operations that follow). The alternative, groups created with the step timeout, would bound start-up by
        # it too; so it is guarded: without it the groups keep the start-up timeout.
        from torch.distributed.distributed_c10d import _set_pg_timeout

        for group in groups.step_groups:
            _set_pg_timeout(timedelta(seconds=seconds), group)
    except Exception as exc:
        raise RuntimeError(f"could not set the step timeout of the process groups ({type(exc).__name__}: {exc})") \
            from exc
    groups.step_timeout_s = seconds


def destroy_parallel(release_graphs: Callable[[], None] | None = None) -> None:
    """Leave the groups. ``release_graphs`` destroys the rank's CUDA graphs first: NCCL frees a communicator only
    once every graph that captured one of its collectives is gone, and waits for ever otherwise."""
    global _GROUPS
    backend = _GROUPS.backend if _GROUPS is not None else None
    _GROUPS = None
    set_tp_group(None, 0, 1)
    if not dist.is_initialized():
        return
    if backend != "nccl":
        dist.destroy_process_group()
        return
    # Destroying NCCL communicators waits on the peers, which may have gone already: on the H200 machine an
    # engine's shutdown hung there. Aborting frees them without waiting; it runs in a thread all the same, so that
    # whatever NCCL does, shutdown returns.
    done = threading.Event()

    def abort() -> None:
        if release_graphs is not None:
            try:  # (in this thread too: with a peer dead, waiting for the device may never end)
                release_graphs()
            except Exception:
                logger.warning("could not release the CUDA graphs before leaving the groups", exc_info=True)
        abort_nccl_groups()
        done.set()

    threading.Thread(target=abort, name="nanovllm-nccl-abort", daemon=True).start()
    if not done.wait(_NCCL_ABORT_TIMEOUT_S):
        logger.warning("the NCCL groups did not close within %.0f s; leaving them to the process's exit",
                       _NCCL_ABORT_TIMEOUT_S)


def abort_nccl_groups() -> None:
    """Abort every process group without waiting for peers (NCCL only; a dead peer would otherwise block)."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:
        logger.debug("could not abort the NCCL groups", exc_info=True)


def broadcast_from_driver(obj: object) -> object:
    """Rank 0 passes ``obj``; every rank gets it back (one pickle, two small gloo broadcasts)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_GROUPS.control)
    return box[0]


def agree_on_kv_pages(num_pages: int, budget_bytes: int) -> int:
    """Every rank sized its own KV pool; all must use the smallest, since one page table serves them all.

    The byte budgets are compared too: on a GPU that another process shares, one rank has less room, and the whole
    engine shrinks to it. That is allowed (it still runs) but worth a warning naming the rank.
    """
    groups = _GROUPS
    if groups is None:
        return num_pages
    mine = torch.tensor([num_pages, budget_bytes], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(groups.world_size)]
    dist.all_gather(everyone, mine, group=groups.control)
    pages = [int(t[0]) for t in everyone]
    budgets = [int(t[1]) for t in everyone]
    low = min(range(len(budgets)), key=budgets.__getitem__)
    high = max(range(len(budgets)), key=budgets.__getitem__)
    if groups.rank == 0 and budgets[high] > 0 and budgets[low] < 0.9 * budgets[high]:
        logger.warning(
            "memory free for the KV cache differs across ranks: rank %d has %.2f GiB, rank %d %.2f GiB; every rank "
            "uses the smallest pool (is another process using a GPU?)",
            low, budgets[low] / (1 << 30), high, budgets[high] / (1 << 30),
        )
    return min(pages)
