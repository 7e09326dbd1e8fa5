"""Request sets for ``bench serve``: random lengths, shared prefixes, and the incast burst plan.

Prompts are random token ids drawn from the tokenizer's ordinary vocabulary (special tokens excluded), so lengths
are exact. ``prompt_format="text"`` decodes them for servers that take text only (lengths then drift a little).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from nanovllm.benchmarks.serve_client import BenchRequest


class PromptMaker:
    def __init__(self, tokenizer: Any | None, vocab_size: int | None, prompt_format: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        if tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            self.ids = [i for i in range(len(tokenizer)) if i not in special]
        else:
            if prompt_format == "text":
                raise ValueError("--prompt-format text needs --tokenizer")
            self.ids = list(range(vocab_size or 10000))

    def tokens(self, n: int) -> list[int]:
        return [self.rng.choice(self.ids) for _ in range(max(n, 1))]

    def request(self, token_ids: list[int], max_tokens: int, kind: str = "main") -> BenchRequest:
        prompt: list[int] | str = token_ids
        if self.prompt_format == "text":
            prompt = self.tokenizer.decode(token_ids)
        return BenchRequest(prompt, len(token_ids), max_tokens, kind)

    def length(self, mean: int, range_ratio: float) -> int:
        low, high = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
        return self.rng.randint(max(low, 1), max(high, 1))


def random_requests(maker: PromptMaker, num: int, input_len: int, output_len: int,
                    range_ratio: float) -> list[BenchRequest]:
    return [maker.request(maker.tokens(maker.length(input_len, range_ratio)), maker.length(output_len, range_ratio))
            for _ in range(num)]


def shared_prefix_requests(maker: PromptMaker, num: int, groups: int, prefix_len: int, suffix_len: int,
                           output_len: int) -> list[BenchRequest]:
    """``groups`` system-prompt-like prefixes, each followed by distinct suffixes; arrival order is shuffled."""
    prefixes = [maker.tokens(prefix_len) for _ in range(groups)]
    requests = [maker.request(prefixes[i % groups] + maker.tokens(suffix_len), output_len) for i in range(num)]
    maker.rng.shuffle(requests)
    return requests


@dataclass
class IncastPlan:
    """Short streaming requests keep ``background_clients`` connections busy for the whole run; after
    ``warmup_s`` the ``burst`` of long prompts arrives at once. The question is what the burst does to the short
    requests' first tokens and to the gaps between their tokens (the answer depends on chunked prefill)."""

    background: list[BenchRequest]  # drawn from in a loop by each background client
    burst: list[BenchRequest]
    background_clients: int
    warmup_s: float
    cooldown_s: float


def incast_plan(maker: PromptMaker, background_clients: int, background_input_len: int, background_output_len: int,
                burst_size: int, burst_input_len: int, burst_output_len: int, warmup_s: float,
                cooldown_s: float) -> IncastPlan:
    background = [maker.request(maker.tokens(background_input_len), background_output_len, "background")
                  for _ in range(max(64, background_clients * 8))]
    burst = [maker.request(maker.tokens(burst_input_len), burst_output_len, "burst") for _ in range(burst_size)]
    return IncastPlan(background, burst, background_clients, warmup_s, cooldown_s)
