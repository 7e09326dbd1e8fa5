"""Request sets for ``bench serve``: random lengths, repeated prefixes, the incast burst plan, and ShareGPT.

Random prompts are made of one of three kinds of unit, the best at hand (``serve.py`` picks):

- token ids (``PromptMaker.from_ids``): exact lengths; the ids are a tokenizer's ordinary vocabulary or the range
  the server's ``/tokenizer_info`` gives, so none is out of the vocabulary;
- token ids decoded to text by a local tokenizer, for the chat API or ``--prompt-format text``, cut until the text
  encodes to no more tokens than asked for (lengths drift a little when the server tokenizes the text again);
- common English words (``PromptMaker.from_words``), when neither a tokenizer nor the vocabulary is known; a word
  costs ``tokens_per_word`` tokens, measured with the server's ``/tokenize`` where it has one.

Where lengths are not exact, the lengths reported are the server's (its usage's ``prompt_tokens``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from nanovllm.benchmarks.lengths import draw_length
from nanovllm.benchmarks.serve_client import BenchRequest
from nanovllm.benchmarks.sharegpt import Sample

# frequent English words, a prompt vocabulary for servers whose tokenizer is unknown
COMMON_WORDS = tuple("""
the of and to in is was for that with as on by at from his her he she it they we you are be this which or an had
not but were have has all one their there been if more when will would who so no out up into do can about said what
time some could than other then them these two may first new only its like over such our man most even made after
also did many before must through back years where much your way well down should because each just those people
how too little state good very make world still own see men work long get here between both life being under never
day same another know while last might us great old year off come since against go came right used take three
""".split())


class PromptMaker:
    def __init__(self, units: Sequence[Any], seed: int, tokenizer: Any = None, as_text: bool = False,
                 tokens_per_word: float | None = None) -> None:
        self.rng = random.Random(seed)
        self.units = list(units)
        self.tokenizer = tokenizer
        self.as_text = as_text  # ids decoded to text (needs the tokenizer)
        self.tokens_per_word = tokens_per_word  # set: the units are words
        self.exact = tokens_per_word is None and not as_text

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, seed: int, as_text: bool, below: int | None = None) -> "PromptMaker":
        """The tokenizer's ordinary vocabulary (special tokens excluded; under ``below`` when the server's
        vocabulary is smaller)."""
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        top = len(tokenizer) if below is None else min(len(tokenizer), below)
        return cls([i for i in range(top) if i not in special], seed, tokenizer, as_text)

    @classmethod
    def from_ids(cls, vocab_size: int, seed: int, special_ids: frozenset[int] = frozenset()) -> "PromptMaker":
        return cls([i for i in range(vocab_size) if i not in special_ids], seed)

    @classmethod
    def from_words(cls, seed: int, tokens_per_word: float) -> "PromptMaker":
        return cls(COMMON_WORDS, seed, tokens_per_word=tokens_per_word)

    def tokens(self, n: int) -> list[Any]:
        """Units for about ``n`` tokens (exactly ``n`` for ids)."""
        count = n if self.tokens_per_word is None else round(n / self.tokens_per_word)
        return [self.rng.choice(self.units) for _ in range(max(count, 1))]

    def request(self, units: list[Any], max_tokens: int, kind: str = "main") -> BenchRequest:
        if self.tokens_per_word is not None:
            return BenchRequest(" ".join(units), round(len(units) * self.tokens_per_word), max_tokens, kind)
        if self.as_text:
            text, length = self._text(units)
            return BenchRequest(text, length, max_tokens, kind)
        return BenchRequest(units, len(units), max_tokens, kind)

    def _text(self, ids: list[int]) -> tuple[str, int]:
        """``ids`` decoded, cut until the text encodes to at most ``len(ids)`` tokens (random ids decode to text
        that often encodes longer), and its length."""
        text = self.tokenizer.decode(ids)
        for _ in range(4):
            again = self.tokenizer.encode(text, add_special_tokens=False)
            if len(again) <= len(ids):
                return text, len(again)
            text = self.tokenizer.decode(again[:max(1, 2 * len(ids) - len(again))])
        return text, len(self.tokenizer.encode(text, add_special_tokens=False))

    def length(self, mean: int, range_ratio: float) -> int:
        return draw_length(self.rng, mean, range_ratio)


def random_requests(maker: PromptMaker, num: int, input_len: int, output_len: int,
                    range_ratio: float) -> list[BenchRequest]:
    return [maker.request(maker.tokens(maker.length(input_len, range_ratio)), maker.length(output_len, range_ratio))
            for _ in range(num)]


def prefix_repetition_requests(maker: PromptMaker, num: int, num_prefixes: int, prefix_len: int, suffix_len: int,
                               output_len: int) -> list[BenchRequest]:
    """``num_prefixes`` system-prompt-like prefixes, each followed by distinct suffixes; arrival order shuffled."""
    prefixes = [maker.tokens(prefix_len) for _ in range(num_prefixes)]
    requests = [maker.request(prefixes[i % num_prefixes] + maker.tokens(suffix_len), output_len) for i in range(num)]
    maker.rng.shuffle(requests)
    return requests


def sharegpt_requests(samples: list[Sample]) -> list[BenchRequest]:
    return [BenchRequest(s.prompt, s.prompt_len, s.output_len) for s in samples]


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
