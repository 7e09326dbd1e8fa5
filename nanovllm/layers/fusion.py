"""Small elementwise functions compiled into fused kernels on CUDA.

A decode step of a 28-layer model runs its norms as hundreds of tiny kernels when written in plain torch (the
rotary embedding and the gated activation have Triton kernels of their own, ``kernels/norm_rope.py`` and
``kernels/activation.py``); each costs a few microseconds of device time even inside a CUDA graph.
``torch.compile`` fuses each function below into one or two kernels. It is used only on CUDA and only when the
forward context asks for it (not with ``enforce_eager``); the eager function remains the reference and the
fallback, taken for good if compilation fails.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

import torch

from nanovllm.layers.attention.context import current_forward_context

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)


def fusible(fn: F) -> F:
    compiled: Callable | None = None
    failed = False

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, failed
        context = current_forward_context()
        if failed or context is None or not context.compile_ops or not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as exc:  # a compiler problem must not take the engine down: run eagerly instead
            logger.warning("torch.compile of %s failed (%s); running it eagerly", fn.__name__, exc)
            failed = True
            return fn(*args)

    return wrapper  # type: ignore[return-value]


@fusible
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@fusible
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    dtype = residual.dtype
    normed = residual.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype), residual
