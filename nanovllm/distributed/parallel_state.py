"""Process groups for tensor parallelism. With nothing initialised, everything is world size 1.

Tensors (all-reduce, all-gather) go over the default group: NCCL on CUDA, gloo on CPU. Step metadata, small
pickled objects, goes over a second, gloo group even on CUDA, so broadcasting it never touches the GPU stream.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_CPU_GROUP: dist.ProcessGroup | None = None
_TP_RANK = 0
_TP_SIZE = 1


def init_tensor_parallel(rank: int, world_size: int, init_method: str, use_cuda: bool,
                         timeout_s: float = 60.0) -> None:
    """Join the group of ``world_size`` ranks (every rank calls this) and make it the tensor-parallel group."""
    global _CPU_GROUP
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    _CPU_GROUP = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    set_tp_group(dist.group.WORLD, rank, world_size)


def shutdown_tensor_parallel() -> None:
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None
    set_tp_group(None, 0, 1)


def broadcast_from_driver(obj: object) -> object:
    """Rank 0 passes ``obj``; every rank returns it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_CPU_GROUP)
    return box[0]


def agree_on_minimum(value: int) -> int:
    """The smallest ``value`` over the ranks (each sizes its own KV pool; all must use the same)."""
    if _TP_SIZE == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_CPU_GROUP)
    return int(tensor.item())


def set_tp_group(group: dist.ProcessGroup | None, rank: int, size: int) -> None:
    global _TP_GROUP, _TP_RANK, _TP_SIZE
    _TP_GROUP, _TP_RANK, _TP_SIZE = group, rank, size


def get_tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x
