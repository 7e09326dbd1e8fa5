"""A launched step's results on their way to the host, and the logprob bookkeeping that shapes them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.engine.scheduler import ModelOutput, ScheduledChunk
from nanovllm.layers.sampler import top_logprobs


@dataclass
class PendingStep:
    """Host tensors being filled by non-blocking copies; valid once ``event`` has completed."""

    sampled_chunks: list[ScheduledChunk]
    token_ids: torch.Tensor | None = None
    logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, values) [B, N + 1]
    prompt: tuple[torch.Tensor, torch.Tensor, list[tuple[str, int, int]]] | None = None
    event: torch.cuda.Event | None = None

    def assign_sample_rows(self) -> None:
        """Tell each sampled request its row in this step's tokens (the next step reads its token from there)."""
        for row, chunk in enumerate(self.sampled_chunks):
            chunk.request.sample_row = row

    def to_model_output(self) -> ModelOutput:
        out = ModelOutput(token_ids=[] if self.token_ids is None else self.token_ids.tolist())
        if self.logprobs is not None:
            ids, values = self.logprobs[0].tolist(), self.logprobs[1].tolist()
            out.logprobs = [
                None if chunk.request.sampling_params.logprobs is None
                else _entry(ids[row], values[row], chunk.request.sampling_params.logprobs)
                for row, chunk in enumerate(self.sampled_chunks)
            ]
        if self.prompt is not None:
            ids, values, spans = self.prompt[0].tolist(), self.prompt[1].tolist(), self.prompt[2]
            row = 0
            for request_id, count, n in spans:
                out.prompt_logprobs[request_id] = [_entry(ids[r], values[r], n) for r in range(row, row + count)]
                row += count
        return out


def prompt_logprobs(logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scored prompt token's logprob followed by the row's top-N (N: the most any request asks)."""
    top_n = max(n for _, _, n in batch.prompt_spans)
    return top_logprobs(logits.float().log_softmax(dim=-1), batch.prompt_targets, top_n)


def _entry(ids: list[int], values: list[float], n: int) -> dict[int, float]:
    """The chosen token first, then the top ``n`` (a dict keeps that order; the chosen one may repeat)."""
    entry = {ids[0]: values[0]}
    for token, value in zip(ids[1 : n + 1], values[1 : n + 1]):
        entry.setdefault(token, value)
    return entry
