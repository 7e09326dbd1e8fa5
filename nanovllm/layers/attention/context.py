"""The one piece of global state layers read: the attention metadata and backend of the forward in progress."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from nanovllm.layers.attention.base import AttentionBackend
from nanovllm.layers.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    backend: AttentionBackend


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside a forward context (use set_forward_context)")
    return _CONTEXT


@contextmanager
def set_forward_context(meta: AttentionMetadata, backend: AttentionBackend) -> Iterator[None]:
    global _CONTEXT
    previous = _CONTEXT
    _CONTEXT = ForwardContext(meta, backend)
    try:
        yield
    finally:
        _CONTEXT = previous
