"""A checkpoint tensor that is read from disk only as far as a weight loader narrows it.

Under tensor parallelism each rank's ``weight_loader`` takes its shard with ``loaded.narrow(dim, start, size)`` or
``loaded[start:end]``. Handing it the whole tensor would make every rank read (and hold, for a moment) every weight
in full; handing it this wrapper turns those calls into safetensors slice reads of just the shard. Anything else a
loader does (``param.copy_(loaded)``, ``loaded.t()``, ``torch.cat([...])``) reads the full tensor once and proceeds
as with a plain tensor, so loaders written for tensors keep working unchanged.
"""
from __future__ import annotations

from typing import Any

import torch


class CheckpointSlice:
    def __init__(self, lazy: Any) -> None:
        self._lazy = lazy  # a safetensors ``PySafeSlice``
        self.shape = torch.Size(lazy.get_shape())
        self._full: torch.Tensor | None = None

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        dim = dim % self.dim()
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._lazy[index]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._lazy[index]

    def materialize(self) -> torch.Tensor:
        if self._full is None:
            self._full = self._lazy[...]  # (``[:]`` fails on a 0-dim tensor, a scalar scale)
        return self._full

    def __getattr__(self, name: str) -> Any:  # tensor methods and attributes (dtype, t, view, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def unwrap(value: Any) -> Any:
            if isinstance(value, CheckpointSlice):
                return value.materialize()
            if isinstance(value, (list, tuple)):
                return type(value)(unwrap(v) for v in value)
            return value

        return func(*unwrap(args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})
