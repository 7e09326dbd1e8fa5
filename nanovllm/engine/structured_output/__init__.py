"""Structured outputs in the engine core: grammars compiled off the step loop, one matcher per request, and the
token bitmask of a step's constrained rows.

A request with ``structured_outputs`` waits in the queue (the scheduler skips it) while its grammar compiles on a
thread, once per distinct constraint (later requests reuse the compiled grammar). Its matcher advances with each
token the engine accepts, and the request ends when the grammar can take no further token. Preemption here keeps
the tokens generated so far (they are recomputed, not resampled), so a matcher never needs to roll back.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from nanovllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

BACKENDS = ("xgrammar", "llguidance")
_CACHE_SIZE = 1024  # distinct constraints kept compiled; the oldest go first


def backend_class(name: str) -> Any:
    if name == "llguidance":
        from nanovllm.engine.structured_output.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend
    from nanovllm.engine.structured_output.xgrammar_backend import XGrammarBackend

    return XGrammarBackend


def validate(spec: StructuredOutputsParams, backend: str) -> None:
    """A schema, regex or grammar the backend cannot read is a ``ValueError`` naming the field."""
    try:
        cls = backend_class(backend)
    except ImportError as exc:
        raise ValueError(f"structured_outputs need the {backend} package ({exc}); pip install {backend}") from None
    cls.validate(spec)


@dataclass
class GrammarState:
    """A request's grammar: compiling (``matcher`` is None), then its matcher."""

    compiled: Future
    matcher: Any = None
    error: str | None = None


@dataclass
class StructuredOutputManager:
    backend_name: str
    vocab_size: int
    load_tokenizer: Callable[[], Any]  # called once, on the compile thread, when the first constraint arrives
    _backend: Any = field(default=None, init=False)
    _cache: dict[str, Future] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        2, thread_name_prefix="nanovllm-grammar"), init=False)

    def start(self, spec: StructuredOutputsParams, eos_token_ids: frozenset[int]) -> GrammarState:
        """Begin compiling ``spec`` (or reuse it): the request waits until ``poll`` gives it its matcher."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._pool.submit(self._compile, spec, eos_token_ids)
                self._cache[key] = future
                if len(self._cache) > _CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
        return GrammarState(future)

    def _compile(self, spec: StructuredOutputsParams, eos_token_ids: frozenset[int]) -> Any:
        with self._lock:
            if self._backend is None:
                self._backend = backend_class(self.backend_name)(self.load_tokenizer(), self.vocab_size,
                                                                  eos_token_ids)
        return self._backend.compile(spec)

    def poll(self, state: GrammarState) -> bool:
        """Whether the grammar is ready (its matcher made now if it just became so); a failed compile sets
        ``state.error``."""
        if state.matcher is not None or state.error is not None:
            return True
        if not state.compiled.done():
            return False
        try:
            compiled = state.compiled.result()  # first: a failed compile (or backend) raises its own error here
            state.matcher = self._backend.matcher(compiled)
        except Exception as exc:  # noqa: BLE001 - the request fails, not the engine
            state.error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        return True

    def bitmask(self, matchers: list[Any]) -> np.ndarray:
        """``[len(matchers), words]`` int32: bit ``t % 32`` of word ``t // 32`` set where token ``t`` is allowed
        (every bit of a terminated matcher's row)."""
        mask = np.full((len(matchers), self._backend.words), -1, dtype=np.int32)
        self._backend.fill_bitmask(matchers, mask)
        return mask

    def accept(self, matchers: list[Any], tokens: list[int]) -> list[bool]:
        """Each matcher takes its token (all at once, on the backend's threads); whether each was allowed."""
        return self._backend.accept_tokens(matchers, tokens) if matchers else []

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
