"""Token sampling: greedy, temperature, top-k, top-p and min-p, reproducible per request, without host syncs.

Before temperature and the filters, the logits go through the request's controls, in this order: penalties, then
``logit_bias``, then ``allowed_token_ids`` (every other token -inf), then bans (stop tokens short of
``min_tokens``, bad words). Logprobs are taken before all of them: they describe the model's own distribution.

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


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per (request seed, output index): ``[B]`` int64, mixed with the same rounds as the noise."""
    return _mix32((seeds ^ (seeds >> 32) ^ (steps * 0x9E3779B1)) & _MASK32)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits to a float32 strictly inside (0, 1). 23 of them: ``k + 0.5`` is then exact in float32, while
    with 24 the largest ``k`` rounded up to exactly 1.0, whose Gumbel noise is infinite (that token always won)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[len(keys), vocab_size]`` floats in (0, 1), a pure function of each row's key and the column."""
    columns = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    return uniform_from_bits(_mix32((keys.view(-1, 1) * 0x01000193 + columns) & _MASK32))


@dataclass
class Penalties:
    """OpenAI-style presence/frequency penalties on output tokens, and the repetition penalty (as in HF and
    vLLM: divide positive logits, multiply negative ones) on every token seen in the prompt or the output."""

    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    output_counts: torch.Tensor  # [B, V] float32: how often each token was generated
    seen: torch.Tensor  # [B, V] bool: in the prompt or the output

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        repetition = self.repetition.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(self.seen, penalised, logits)
        logits = logits - self.frequency.unsqueeze(1) * self.output_counts
        return logits - self.presence.unsqueeze(1) * (self.output_counts > 0).float()


@dataclass
class ConditionalBans:
    """Bans decided on the device: a bad word whose prefix ends with the row's newest token, which was still on
    the device when the host built the step (overlap scheduling). ``tokens[i]`` is banned in row ``rows[i]`` when
    that row's input token, ``input_ids[inputs[i]]``, is ``after[i]`` (the host checked the rest of the prefix)."""

    rows: torch.Tensor  # [C] int64
    tokens: torch.Tensor  # [C] int64
    after: torch.Tensor  # [C] int64
    input_ids: torch.Tensor  # the step's input tokens, the pending ones filled in by the forward
    inputs: torch.Tensor  # [C] int64: each row's last input token in input_ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """In place. Adding -inf or 0 (rather than assigning) keeps repeated (row, token) pairs exact in any order."""
        hit = self.input_ids[self.inputs] == self.after
        penalty = torch.where(hit, float("-inf"), 0.0).to(logits.dtype)
        return logits.index_put_((self.rows, self.tokens), penalty, accumulate=True)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    # with logprobs asked for: the sampled token then the top-N, ids and log-probabilities, [B, N + 1]
    logprob_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None


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
    # (rows, token ids) that may not be sampled: stop tokens of requests still short of min_tokens, bad words
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    penalties: Penalties | None = None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, biases)
    # (restricted rows, then (rows, token ids) they may sample): allowed_token_ids
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    conditional_bans: ConditionalBans | None = None
    # structured outputs: the constrained rows and their int32 token bitmask (which may be set after the forward)
    grammar_rows: torch.Tensor | None = None
    grammar_bitmask: torch.Tensor | None = None
    num_logprobs: int = -1  # the most top logprobs any row asks for; -1: none


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logprobs describe the model's own distribution, before penalties, temperature and filters
        raw_logprobs = logits.float().log_softmax(dim=-1) if batch.num_logprobs >= 0 else None
        token_ids = self._sample(logits, batch)
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        ids, values = top_logprobs(raw_logprobs, token_ids, batch.num_logprobs)
        return SamplerOutput(token_ids, ids, values)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.penalties is not None:
            logits = batch.penalties.apply(logits.float())
        if (batch.banned is not None or batch.logit_bias is not None or batch.allowed is not None
                or batch.conditional_bans is not None):
            logits = _apply_logit_controls(logits, batch)
        if batch.grammar_bitmask is not None:
            if logits.is_cuda:  # in place: log-probs were taken before, and nothing reads these logits after
                from nanovllm.kernels.token_bitmask import mask_disallowed_

                mask_disallowed_(logits, batch.grammar_rows, batch.grammar_bitmask)
            else:
                logits = apply_token_bitmask(logits, batch.grammar_rows, batch.grammar_bitmask)
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        is_random = batch.temperatures > 0
        inv_temperatures = 1.0 / torch.where(is_random, batch.temperatures, 1.0)
        if batch.use_min_p or batch.use_top_k_top_p:
            logits = logits.float() * inv_temperatures.unsqueeze(1)
            inv_temperatures = torch.ones_like(inv_temperatures)
            if batch.use_min_p:
                logits = _apply_min_p(logits, batch.min_ps)
            if batch.use_top_k_top_p:
                logits = _apply_top_k_top_p(logits, batch.top_ks, batch.top_ps)
        if logits.is_cuda:  # one pass, the noise made in registers
            from nanovllm.kernels.sampling import gumbel_argmax

            return gumbel_argmax(logits, inv_temperatures, batch.keys, is_random)
        gumbel = -torch.log(-torch.log(uniform_noise(batch.keys, logits.shape[-1])))
        scores = logits.float() * inv_temperatures.unsqueeze(1) + torch.where(is_random.unsqueeze(1), gumbel, 0.0)
        return scores.argmax(dim=-1)


def _apply_logit_controls(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, allowed_token_ids and bans, on a float32 copy (never write into a graph's output buffer).

    A row that the bans would leave without any token (they cover all of its allowed tokens) keeps its allowed
    tokens instead: it still samples one of those, rather than a token the row does not allow."""
    logits = logits.float().clone()
    if batch.logit_bias is not None:
        rows, tokens, biases = batch.logit_bias
        logits.index_put_((rows, tokens), biases, accumulate=True)  # each (row, token) once
    unbanned = None
    if batch.allowed is not None:
        restricted, rows, tokens = batch.allowed
        blocked = torch.zeros_like(logits, dtype=torch.bool)
        blocked[restricted] = True
        blocked[rows, tokens] = False
        logits.masked_fill_(blocked, float("-inf"))
        if batch.banned is not None or batch.conditional_bans is not None:
            unbanned = logits.clone()
    if batch.banned is not None:
        logits[batch.banned] = float("-inf")
    if batch.conditional_bans is not None:
        batch.conditional_bans.apply(logits)
    if unbanned is not None:
        nothing_left = torch.isneginf(logits).all(dim=-1, keepdim=True)
        logits = torch.where(nothing_left, unbanned, logits)
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``-inf`` for the tokens a row's grammar does not allow (a new tensor: the logits may be a graph's output).
    Bit ``t % 32`` of ``bitmask[i, t // 32]`` set means row ``rows[i]`` may sample token ``t``; a bitmask narrower
    than the vocabulary (a grammar over the tokenizer's ids, a head padded past them) allows none of the rest."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    width = allowed.shape[1]
    blocked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    blocked[rows, :width] = ~allowed
    blocked[rows, width:] = True
    return logits.masked_fill(blocked, float("-inf"))


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen token's logprob followed by the ``n`` largest: ids and values, ``[B, n + 1]``."""
    chosen = chosen.view(-1, 1)
    chosen_values = logprobs.gather(1, chosen)
    if n == 0:
        return chosen, chosen_values
    top_values, top_ids = logprobs.topk(n, dim=-1)
    return torch.cat([chosen, top_ids], dim=1), torch.cat([chosen_values, top_values], dim=1)


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
