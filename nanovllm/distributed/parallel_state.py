"""Process groups for tensor parallelism. With nothing initialised, everything is world size 1."""
from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_TP_RANK = 0
_TP_SIZE = 1


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
