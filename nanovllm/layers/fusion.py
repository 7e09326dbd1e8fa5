"""Small elementwise functions compiled into fused kernels on CUDA.

A decode step of a 28-layer model runs its norms as hundreds of tiny kernels when written in plain torch (the
rotary embedding and the gated activation have Triton kernels of their own, ``kernels/norm_rope.py`` and
``kernels/activation.py``); each costs a few microseconds of device time even inside a CUDA graph.
``torch.compile`` fuses each function below into one or two kernels. Layers built for the fast path (CUDA, not
``enforce_eager``) call them through ``compiled``; the eager functions remain the reference.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

import torch

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def compiled(fn: F) -> F:
    """``fn`` compiled into fused kernels on first use; the eager ``fn`` is the reference, used for CPU tensors and
    for good if compilation fails (a compiler problem must not take the engine down)."""
    compiled_fn: Callable | None = None
    failed = False

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled_fn, failed
        if failed or not args[0].is_cuda:
            return fn(*args)
        if compiled_fn is None:
            compiled_fn = torch.compile(fn, dynamic=True)
        try:
            return compiled_fn(*args)
        except Exception as exc:  # noqa: BLE001
            logger.warning("torch.compile of %s failed (%s); running it eagerly", fn.__name__, exc)
            failed = True
            return fn(*args)

    return wrapper  # type: ignore[return-value]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    dtype = residual.dtype
    normed = residual.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype), residual


compiled_rms_norm = compiled(rms_norm)
compiled_add_rms_norm = compiled(add_rms_norm)
