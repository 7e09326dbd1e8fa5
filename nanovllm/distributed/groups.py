"""The process groups of one parallel engine: who is who among ``tp * pp`` ranks, and how they meet.

Ranks are laid out stage-major: rank = stage * tp_size + tp_rank, so the tensor-parallel group of a pipeline stage
is a run of consecutive ranks (on one host when a host holds a whole stage), and a rank's peer in another stage has
the same tp_rank. Three kinds of group:

- the default (world) group: NCCL on CUDA, gloo on CPU; pipeline sends and receives go over it;
- one tensor-parallel group per stage (the world itself when there is one stage); layers read it through
  ``parallel_state``;
- a gloo "control" group over all ranks, for step metadata (small pickled objects) and start-up agreement. It never
  touches a GPU stream. Timeouts are per rank: a worker waits on it whenever the engine is idle, which may be hours,
  so its timeout is long; the driver's is the collective timeout, so a hung worker ends in an error. A peer that
  dies breaks the group at once either way (its sockets close).

The rendezvous is a ``TCPStore`` hosted by rank 0: on a port the OS picks (spawned workers on one host, so two
engines never collide) or at ``MASTER_ADDR:MASTER_PORT`` (torchrun-style launch across hosts). Rank 0 also leaves
the engine config in the store for the workers to read.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from nanovllm.distributed.parallel_state import set_tp_group

logger = logging.getLogger(__name__)

# Collectives on tensors: long enough for the slowest rank to load its weights before the first one (start-up is
# where ranks drift apart most), short enough that a hung rank ends in an error. A dead rank errors at once.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("NANOVLLM_DIST_TIMEOUT_S", "600"))
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
                         timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def join_store(addr: str, port: int, world_size: int) -> dist.TCPStore:
    """A worker's side: retries until rank 0 listens (on another host it may start later) or the timeout."""
    return dist.TCPStore(addr, port, world_size, is_master=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


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
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # a timeout is each rank's own: workers may wait for the next step for ever, the driver may not wait on them
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S) if rank == 0
                             else _IDLE_TIMEOUT)
    groups = ParallelGroups(rank, world_size, tp_size, pp_size, control, backend)
    tp_group = dist.group.WORLD
    if pp_size > 1 and tp_size > 1:  # every rank must create every group, in the same order
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
            if stage == groups.pp_rank:
                tp_group = group
    set_tp_group(tp_group if tp_size > 1 else None, groups.tp_rank, tp_size)
    _GROUPS = groups
    logger.debug("rank %d of %d joined (stage %d, tp rank %d, %s)", rank, world_size, groups.pp_rank,
                 groups.tp_rank, backend)
    return groups


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
