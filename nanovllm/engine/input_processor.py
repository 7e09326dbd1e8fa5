"""Front-end checks: turn a prompt and its sampling params into a valid engine ``Request``, or a ``ValueError``."""
from __future__ import annotations

import random
from typing import Any, Sequence

from nanovllm.config import EngineConfig
from nanovllm.engine.request import Request
from nanovllm.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def eos_token_ids(hf_config: Any, generation_config: Any, tokenizer: Any) -> frozenset[int]:
    """Every id any of the three sources calls end-of-sequence."""
    ids: set[int] = set()
    for source in (generation_config, hf_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.vocab_size = config.hf_config.vocab_size
        self._seeds = random.Random(config.seed)

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise ValueError("prompt must not be empty (it has no tokens)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        max_model_len = self.config.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - num_prompt
        if num_prompt + max_tokens > max_model_len or max_tokens < 1:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) must be at most "
                f"max_model_len ({max_model_len})"
            )
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad_stop}")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling_params=params,
            max_tokens=max_tokens,
            sampling_seed=seed,
            eos_token_ids=self.eos_ids,
        )
