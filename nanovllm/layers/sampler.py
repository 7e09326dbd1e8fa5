"""Token sampling: greedy, temperature, top-k, top-p and min-p, reproducible per request, without host syncs.

Randomness comes from a counter-based hash of (request seed, output position, token id) rather than a stateful
generator. A request's samples therefore depend only on its own seed and its logits, never on which other requests
share the batch, on preemption, or on the device: the same seed gives the same tokens everywhere. Sampling from
``softmax(l)`` is done as ``argmax(l + Gumbel noise)`` (the Gumbel-max trick), which needs no cumulative sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31, so products of 32-bit values stay inside int64
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    for multiplier in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int, step: int) -> int:
    """A 32-bit key per (request seed, output index), mixed on the host once per row."""
    x = (seed ^ (seed >> 32) ^ (step * 0x9E3779B1)) & _MASK32
    for multiplier in _MULTIPLIERS:
        x ^= x >> 16
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[len(keys), vocab_size]`` floats in (0, 1), a pure function of each row's key and the column."""
    columns = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _mix32((keys.view(-1, 1) * 0x01000193 + columns) & _MASK32)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors; flags say which optional filters any row needs."""

    temperatures: torch.Tensor  # [B] float32; 0 for greedy rows
    top_ks: torch.Tensor  # [B] int64; vocab size when disabled
    top_ps: torch.Tensor  # [B] float32
    min_ps: torch.Tensor  # [B] float32
    keys: torch.Tensor  # [B] int64 row keys for the noise
    all_greedy: bool
    use_top_k_top_p: bool
    use_min_p: bool
    # (rows, token ids) that may not be sampled yet: stop tokens of requests still short of min_tokens
    banned: tuple[torch.Tensor, torch.Tensor] | None = None


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits.float()
        if batch.banned is not None:
            logits = logits.index_put(batch.banned, torch.tensor(float("-inf"), device=logits.device))
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        temperatures = torch.where(batch.temperatures > 0, batch.temperatures, 1.0)
        logits = logits / temperatures.unsqueeze(1)
        if batch.use_min_p:
            logits = _apply_min_p(logits, batch.min_ps)
        if batch.use_top_k_top_p:
            logits = _apply_top_k_top_p(logits, batch.top_ks, batch.top_ps)
        gumbel = -torch.log(-torch.log(uniform_noise(batch.keys, logits.shape[-1])))
        sampled = (logits + gumbel).argmax(dim=-1)
        return torch.where(batch.temperatures > 0, sampled, greedy)


def _apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_ps.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Keep the ``top_k`` largest logits, then the smallest prefix of them whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_ks.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_ps.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
