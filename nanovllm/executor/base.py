"""The executor interface: what the engine core asks of whatever runs the model (one device, or many ranks).

A step is launched and collected in two calls, so the engine can schedule the next step while this one runs:
``launch`` queues the forward and the sampler and starts copying the results to the host; ``collect`` waits for
them. ``ModelRunner`` (one device), ``ParallelExecutor`` (tensor and pipeline ranks) implement it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from nanovllm.executor.input_batch import HostBatch, PromptSpan


@dataclass
class ModelOutput:
    """A collected step; lists follow the batch's sampled rows."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None] | None = None
    # per request id: logprobs of the prompt tokens this step's chunk covered (entries for positions >= 1)
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)


@dataclass
class LaunchedStep:
    """A launched step's results: host tensors being filled by non-blocking copies, valid once ``event`` is done."""

    row_logprobs: list[int | None]  # per sampled row: the top logprobs it asked for
    token_ids: torch.Tensor | None = None
    logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values) [B, N + 1]
    prompt_ids: torch.Tensor | None = None  # [prompt rows, N + 1]
    prompt_values: torch.Tensor | None = None
    prompt_spans: list[PromptSpan] = field(default_factory=list)
    event: torch.cuda.Event | None = None
    unsampled: tuple[torch.Tensor, Any] | None = None  # (logits, sampling batch) waiting for a grammar bitmask

    @classmethod
    def for_batch(cls, host: HostBatch) -> "LaunchedStep":
        return cls(row_logprobs=host.sampling.row_logprobs if host.sampling is not None else [],
                   prompt_spans=host.prompt.spans if host.prompt is not None else [])

    def to_model_output(self) -> ModelOutput:
        out = ModelOutput(token_ids=[] if self.token_ids is None else self.token_ids.tolist())
        if self.logprobs is not None:
            ids, values = self.logprobs[0].tolist(), self.logprobs[1].tolist()
            out.logprobs = [None if n is None else _entry(ids[row], values[row], n)
                            for row, n in enumerate(self.row_logprobs)]
        if self.prompt_ids is not None and self.prompt_values is not None:
            ids, values = self.prompt_ids.tolist(), self.prompt_values.tolist()
            row = 0
            for span in self.prompt_spans:
                out.prompt_logprobs[span.request_id] = [
                    _entry(ids[r], values[r], span.top_n) for r in range(row, row + span.num_tokens)
                ]
                row += span.num_tokens
        return out


def _entry(ids: list[int], values: list[float], n: int) -> dict[int, float]:
    """The chosen token first, then the top ``n`` (a dict keeps that order; the chosen one may repeat)."""
    entry = {ids[0]: values[0]}
    for token, value in zip(ids[1 : n + 1], values[1 : n + 1]):
        entry.setdefault(token, value)
    return entry


class Executor(Protocol):
    num_kv_blocks: int  # pages in the KV pool (the smallest over all ranks)
    device_type: str  # "cuda" or "cpu": overlap scheduling is on by default for CUDA
    num_micro_batches: int  # steps the engine keeps in flight at once: one per pipeline stage
    # whether ``launch`` takes a batch whose grammar bitmask comes later, through ``sample``
    samples_later: bool

    def launch(self, batch: HostBatch) -> LaunchedStep: ...

    def sample(self, step: LaunchedStep, grammar_bitmask: np.ndarray) -> None:
        """Sample a step launched without its grammar bitmask (``samples_later`` executors only)."""
        ...

    def collect(self, step: LaunchedStep) -> ModelOutput: ...

    def take_wait_time(self) -> float:
        """Seconds spent blocked on the device since the last call (the engine reports the host's share)."""
        ...

    def model_info(self) -> dict[str, Any]: ...

    def shutdown(self) -> None:
        """Stop any worker processes; the engine is unusable afterwards. Safe to call more than once."""
        ...

