"""The one intake of every front end: a prompt and its sampling params become validated ``EngineRequest`` specs, or a
``ValueError`` naming what is wrong, before anything is queued."""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from nanovllm.config import EngineConfig
from nanovllm.engine.messages import EngineRequest
from nanovllm.sampling_params import SamplingParams

Prompt = str | Sequence[int]
_INT64 = 1 << 64


@dataclass(frozen=True)
class ProcessedRequest:
    """A user request ready for the engine: its ``n`` samples are ``engine_requests``."""

    request_id: str
    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    engine_requests: tuple[EngineRequest, ...]


def sample_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def sample_seed(seed: int, index: int, n: int) -> int:
    """The sampling seed of sample ``index``: the user's seed (as a signed 64-bit integer) for a single sample,
    else a hash of the seed and the index, so samples differ and no seed can overflow."""
    if n == 1:
        seed %= _INT64
        return seed - _INT64 if seed >= 1 << 63 else seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any, eos_ids: frozenset[int], num_kv_pages: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.num_kv_pages = num_kv_pages
        self.vocab_size: int = config.hf_config.vocab_size
        self.max_model_len: int = config.max_model_len  # type: ignore[assignment]
        self._seeds = random.Random(config.seed)

    def process(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> ProcessedRequest:
        text, prompt_ids = self.tokenize(prompt)
        max_tokens = self._check(prompt_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        prompt_tuple = tuple(prompt_ids)
        samples = tuple(
            EngineRequest(
                request_id=sample_request_id(request_id, i, params.n),
                prompt_token_ids=prompt_tuple,
                sampling_params=params,
                max_tokens=max_tokens,
                sampling_seed=(sample_seed(params.seed, i, params.n) if params.seed is not None
                               else self._seeds.getrandbits(63)),
                eos_token_ids=self.eos_ids,
                arrival_time=arrival,
            )
            for i in range(params.n)
        )
        return ProcessedRequest(request_id, text, prompt_ids, params, samples)

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

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A conversation as prompt token ids, through the tokenizer's chat template (which already holds any
        special tokens, so none are added again)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages need a chat template, and this model has none; send a plain prompt")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
            )
        except Exception as exc:  # noqa: BLE001 - a template is code run on user data; any failure is bad input
            raise ValueError(f"the chat template could not render these messages: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Everything about the request that depends on the model and the pool; returns its resolved max_tokens."""
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise ValueError("prompt must not be empty (it has no tokens)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len or max_tokens < 1:
            raise ValueError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) must be at most "
                f"max_model_len ({self.max_model_len})"
            )
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad_stop}")
        block_size = self.config.block_size
        needed = -(-(num_prompt + max_tokens) // block_size)
        if needed > self.num_kv_pages:  # it would wait for room for ever
            raise ValueError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} KV pages, but the "
                f"whole pool has {self.num_kv_pages} ({self.num_kv_pages * block_size} tokens)"
            )
        return max_tokens
