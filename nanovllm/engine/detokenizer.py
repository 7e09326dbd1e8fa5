"""Incremental detokenization with stop strings.

Decoding token by token goes wrong where one character spans several tokens (multi-byte UTF-8) or where a
tokenizer's spacing depends on the previous token. So each step decodes a short window twice, with and without
the newest tokens, and emits only the difference, holding back text that ends in an incomplete character.
"""
from __future__ import annotations

from typing import Any

from nanovllm.engine.stop_matcher import StopMatcher

_CONTEXT_TOKENS = 5  # prompt tokens used as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool, stop: list[str]
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = StopMatcher(stop) if stop else None
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int]) -> str:
        """Feed new tokens; return the text they complete. After a stop string, ``stop_reason`` is set and the
        text is cut before it."""
        self.ids.extend(new_token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._append(delta)

    def flush(self) -> str:
        """At the end of a request: emit the text held back for an incomplete character (as U+FFFD), as a full
        decode would show it."""
        if self.stop_reason is not None or self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if len(full_text) <= len(prefix_text):
            return ""
        return self._append(full_text[len(prefix_text) :])

    def _append(self, delta: str) -> str:
        before = len(self.text)
        self.text += delta
        hit = self.stops.find(self.text, before) if self.stops is not None else None
        if hit is not None:
            index, self.stop_reason = hit
            self.text = self.text[:index]
            return self.text[before:] if index > before else ""
        return delta
