"""ShareGPT conversations from a local JSON file (no hub), for ``bench serve`` and ``bench throughput``.

The file is in ShareGPT's format: a list of records, each with ``conversations``, a list of turns
``{"from": "human" | "gpt", "value": text}``. As in vLLM, records with fewer than two turns are dropped, the rest are
shuffled with the seed, and each gives one request: its first turn is the prompt and the token count of its second
is the output length (unless a fixed output length is given). Pairs shorter than 4 tokens, prompts over 1,024 tokens
and pairs over 2,048 tokens are skipped, and so is any pair that does not fit the model's ``max_model_len``. When
fewer pairs qualify than requests are asked for, requests are drawn again from those that do (and that is logged).
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048
BATCH = 64  # conversations tokenized at once
# what a counter gives for one text: its token ids, or only their number (None: too long to count)
Tokens = Sequence[int] | int | None


@dataclass(frozen=True)
class Conversation:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Sample:
    prompt: str
    prompt_len: int
    output_len: int
    prompt_ids: tuple[int, ...] | None = None  # when the counter gave ids: the prompt need not be tokenized again


def load_conversations(path: str | None, seed: int, shuffle: bool = True) -> list[Conversation]:
    """The (prompt, completion) pairs of a ShareGPT JSON file, shuffled with ``seed``."""
    if not path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path: a local ShareGPT JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except OSError as exc:
        raise ValueError(f"--dataset-path {path!r} cannot be read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"--dataset-path {path!r} is not JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"--dataset-path {path!r} is not a ShareGPT file: expected a list of records with "
                         f"'conversations', got a {type(records).__name__}")
    pairs = []
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if isinstance(first, dict) and isinstance(second, dict) and isinstance(first.get("value"), str) \
                and isinstance(second.get("value"), str):
            pairs.append(Conversation(first["value"], second["value"]))
    if not pairs:
        raise ValueError(f"--dataset-path {path!r} holds no ShareGPT record with two turns "
                         "({'conversations': [{'from': ..., 'value': ...}, ...]})")
    if shuffle:
        random.Random(seed).shuffle(pairs)
    return pairs


def sample(conversations: list[Conversation], num: int, count_tokens: Callable[[list[str]], Sequence[Tokens]],
           max_model_len: int | None, output_len: int | None, seed: int) -> list[Sample]:
    """``num`` requests: the first qualifying pairs in order, drawn again at random if too few qualify.
    ``count_tokens`` gives, for a batch of texts, each one's token ids (a prompt's are kept with its sample) or only
    its token count (None: too long to count)."""
    if output_len is not None and output_len < 1:
        raise ValueError(f"the output length for sharegpt must be at least 1, got {output_len}")
    max_total = MAX_TOTAL_TOKENS if max_model_len is None else min(MAX_TOTAL_TOKENS, max_model_len)
    samples: list[Sample] = []
    for batch in _batches(conversations):
        tokens = count_tokens([c.prompt for c in batch] + ([] if output_len else [c.completion for c in batch]))
        counts = [len(t) if isinstance(t, Sequence) else t for t in tokens]
        for i, conv in enumerate(batch):
            prompt_len = counts[i]
            out = output_len or counts[len(batch) + i]
            if prompt_len is None or out is None:
                continue
            too_short = prompt_len < MIN_TOKENS or (output_len is None and out < MIN_TOKENS)
            if too_short or prompt_len > MAX_PROMPT_TOKENS or prompt_len + out > max_total:
                continue
            ids = tokens[i]
            samples.append(Sample(conv.prompt, prompt_len, out, tuple(ids) if isinstance(ids, Sequence) else None))
            if len(samples) == num:
                return samples
    if not samples:
        raise ValueError(f"no ShareGPT pair fits: each needs at least {MIN_TOKENS} tokens a side and at most "
                         f"{max_total} in all (max_model_len {max_model_len})")
    logger.warning("only %d ShareGPT pairs qualify for %d requests: the rest are drawn again from them",
                   len(samples), num)
    rng = random.Random(seed)
    return samples + rng.choices(samples, k=num - len(samples))


def _batches(conversations: list[Conversation]) -> Iterator[list[Conversation]]:
    for start in range(0, len(conversations), BATCH):
        yield conversations[start:start + BATCH]
