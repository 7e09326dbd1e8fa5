"""The one intake of every front end: a prompt and its sampling params become validated ``EngineRequest`` specs, or a
``ValueError`` naming what is wrong, before anything is queued."""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from nanovllm.config import EngineConfig
from nanovllm.engine.messages import EngineRequest
from nanovllm.engine.structured_output import validate as validate_structured_outputs
from nanovllm.sampling_params import SamplingParams

Prompt = str | Sequence[int]


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


def sample_seed(seed: int, index: int) -> int:
    """Sample ``index`` samples with ``seed + index`` (as vLLM does), wrapped into a signed 64-bit integer so
    that no seed can overflow the step's arrays."""
    return (seed + index + (1 << 63)) % (1 << 64) - (1 << 63)


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any, eos_ids: frozenset[int], num_kv_pages: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.num_kv_pages = num_kv_pages
        self.vocab_size: int = config.hf_config.vocab_size
        self.max_model_len: int = config.max_model_len  # type: ignore[assignment]
        self._seeds = random.Random(config.seed)
        self._longest: int | None = None  # characters of the longest token, read from the vocabulary once

    def process(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> ProcessedRequest:
        """``prompt_text``: the text that token-id prompts were made from (a rendered chat), for the outputs."""
        text, prompt_ids = self.tokenize(prompt)
        text = text if text is not None else prompt_text
        max_tokens = self._check(prompt_ids, params)
        if params.bad_words:
            params = self._tokenize_bad_words(params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        prompt_tuple = tuple(prompt_ids)
        samples = tuple(
            EngineRequest(
                request_id=sample_request_id(request_id, i, params.n),
                prompt_token_ids=prompt_tuple,
                sampling_params=params,
                max_tokens=max_tokens,
                sampling_seed=(sample_seed(params.seed, i) if params.seed is not None
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
            return prompt, self.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A conversation as prompt token ids, through the tokenizer's chat template (which already holds any
        special tokens, so none are added again)."""
        return self.encode(self.render_chat_text(messages, add_generation_prompt, template_kwargs),
                           add_special_tokens=False)

    def render_chat_text(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages need a chat template, and this model has none; send a plain prompt")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
            )
        except Exception as exc:  # noqa: BLE001 - a template is code run on user data; any failure is bad input
            raise ValueError(f"the chat template could not render these messages: {exc}") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a text that cannot fit ``max_model_len`` is refused without tokenizing all of it
        (a request of megabytes would otherwise cost seconds of CPU and a lot of memory for nothing)."""
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
        limit = self.max_model_len
        # no token stands for more than `longest` characters (4x: normalizers may merge a few characters)
        if len(text) > 4 * limit * self._longest_token_chars():
            raise ValueError(f"prompt ({len(text)} characters) is longer than max_model_len ({limit} tokens)")
        head = 8 * (limit + 16)
        if len(text) > head and len(self.tokenizer.encode(text[:head], add_special_tokens=False)) > limit + 16:
            raise ValueError(f"prompt (more than {limit} tokens in its first {head} characters) is longer than "
                             f"max_model_len ({limit} tokens)")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _longest_token_chars(self) -> int:
        if self._longest is None:
            self._longest = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        return self._longest

    def _tokenize_bad_words(self, params: SamplingParams) -> SamplingParams:
        """A copy of ``params`` with ``bad_words_token_ids``: each word (leading spaces stripped) tokenized as-is
        and after a space, without special tokens, as vLLM does, so it is banned at the start of the text and
        after a space. (vLLM keeps the spaced form only when it has as many tokens as the other; this keeps every
        distinct form, which bans at least as much.)"""
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer, and this engine has none")
        sequences: list[list[int]] = []
        for word in params.bad_words or ():
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in sequences:
                    sequences.append(ids)
        out_of_vocab = sorted({t for ids in sequences for t in ids if not 0 <= t < self.vocab_size})
        if out_of_vocab:
            raise ValueError(f"bad_words tokenize to ids outside the vocabulary [0, {self.vocab_size}): "
                             f"{out_of_vocab[:5]}")
        if params.allowed_token_ids is not None:
            always_banned = {ids[0] for ids in sequences if len(ids) == 1}
            if always_banned.issuperset(params.allowed_token_ids):
                raise ValueError("bad_words ban every token of allowed_token_ids; no token could be sampled")
        tokenized = dataclasses.replace(params)  # the caller's params may serve other requests: not changed
        tokenized.bad_words_token_ids = sequences
        return tokenized

    @property
    def max_request_tokens(self) -> int:
        """The most tokens one request may hold, its prompt and max_tokens together: max_model_len, and no more than
        the whole KV pool (a request that needs more pages than there are would wait for room for ever)."""
        return min(self.max_model_len, self.num_kv_pages * self.config.block_size)

    def check_length(self, num_prompt: int, max_tokens: int) -> None:
        """A ``ValueError`` naming the limit when a prompt of ``num_prompt`` tokens and ``max_tokens`` more exceed
        ``max_request_tokens``."""
        if num_prompt + max_tokens <= self.max_request_tokens:
            return
        if num_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) must be at most "
                             f"max_model_len ({self.max_model_len})")
        block_size = self.config.block_size
        raise ValueError(
            f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs "
            f"{-(-(num_prompt + max_tokens) // block_size)} KV pages, but the whole pool has {self.num_kv_pages} "
            f"({self.num_kv_pages * block_size} tokens)"
        )

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Everything about the request that depends on the model and the pool; returns its resolved max_tokens."""
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise ValueError("prompt must not be empty (it has no tokens)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if params.max_tokens is None and num_prompt >= self.max_model_len:
            raise ValueError(f"prompt ({num_prompt} tokens) leaves no room to generate within max_model_len "
                             f"({self.max_model_len})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        self.check_length(num_prompt, max_tokens)
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad_stop}")
        if params.logit_bias:
            bad_bias = [t for t in params.logit_bias if t >= self.vocab_size]
            if bad_bias:
                raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {bad_bias[:5]}")
        if params.allowed_token_ids is not None:
            if len(params.allowed_token_ids) > self.vocab_size:
                raise ValueError(f"allowed_token_ids may hold at most the vocabulary size ({self.vocab_size}) ids, "
                                 f"got {len(params.allowed_token_ids)}")
            bad_allowed = [t for t in params.allowed_token_ids if t >= self.vocab_size]
            if bad_allowed:
                raise ValueError(f"allowed_token_ids must be in [0, {self.vocab_size}), got {bad_allowed[:5]}")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer, and this model has none")
            validate_structured_outputs(params.structured_outputs, self.config.structured_outputs_backend)
        return max_tokens
