"""Incremental detokenization with stop strings.

Decoding token by token goes wrong where one character spans several tokens (multi-byte UTF-8) or where a
tokenizer's spacing depends on the previous token. Both decoders here keep a short window of recent tokens, decode it
with and without the newest ones, emit only the difference, and hold back text that ends in an incomplete character:

- ``tokenizers.decoders.DecodeStream`` does that in Rust, decoding the window once per step. It is used wherever the
  tokenizer is a fast (``tokenizers``-backed) one whose ``decode`` is its backend's ``decode`` unchanged.
- Otherwise (a slow or custom tokenizer, an old ``tokenizers``, or a tokenizer that cleans up spaces after
  decoding) the same window is decoded here with the tokenizer's own ``decode``, twice per step.

Both give the same text. The last few prompt tokens are the first window, so the first output tokens get the spacing
they have after the prompt, unless those prompt tokens end inside a character: then the output starts on its own, so
that no prompt byte completes a character of the output. For a byte-level tokenizer (GPT-2, Llama 3, Qwen, SmolLM2)
the flushed text is exactly ``tokenizer.decode(output_ids, skip_special_tokens=...)``.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Protocol

from nanovllm.engine.stop_matcher import StopMatcher

logger = logging.getLogger(__name__)

_CONTEXT_TOKENS = 5  # prompt tokens used as left context for the first output tokens
_INCOMPLETE = "\ufffd"  # what a decoder shows for the bytes of a character that is not complete yet


class _Decoder(Protocol):
    def step(self, new_token_ids: list[int]) -> str:
        """The text that ``new_token_ids`` complete ("" while a character is incomplete)."""

    def finish(self) -> str:
        """The text still held back (an incomplete character, shown as U+FFFD, as a full decode shows it)."""


class _WindowDecoder:
    """The windowed method with the tokenizer's own ``decode``: any tokenizer."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, ids: list[int], read_offset: int) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = ids
        self.prefix_offset = 0
        self.read_offset = read_offset  # ids[:read_offset] are emitted (or context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, new_token_ids: list[int]) -> str:
        self.ids.extend(new_token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text) :]

    def finish(self) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


class _StreamDecoder:
    """``tokenizers``' ``DecodeStream`` over the fast tokenizer's backend."""

    def __init__(self, tokenizer: Any, backend: Any, skip_special_tokens: bool, context: list[int]) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.backend = backend
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.emitted = list(context)  # the tokens of the last step that emitted text (the context at first)
        self.pending: list[int] = []  # tokens since, whose text is held back
        self.fallback: _WindowDecoder | None = None

    def step(self, new_token_ids: list[int]) -> str:
        if self.fallback is not None:
            return self.fallback.step(new_token_ids)
        try:
            text = self.stream.step(self.backend, list(new_token_ids))
        except Exception as exc:  # noqa: BLE001 - the stream's state is lost; the window method carries on
            # (DecodeStream refuses a decode whose text does not extend the previous one, which a few exotic
            # decoders produce; the window method only compares lengths)
            logger.warning("DecodeStream failed (%s); decoding the rest of this request with the window method", exc)
            self.fallback = _WindowDecoder(self.tokenizer, self.skip_special_tokens,
                                           self.emitted + self.pending, len(self.emitted))
            self.emitted = self.pending = []
            return self.fallback.step(new_token_ids)
        if text is None:
            self.pending.extend(new_token_ids)
            return ""
        self.emitted = self.pending + list(new_token_ids)
        self.pending = []
        return text

    def finish(self) -> str:
        if self.fallback is None:
            if not self.pending:
                return ""
            # the held-back tokens' text, as the window method would give it (the same decode, chosen by
            # decode_stream_backend)
            self.fallback = _WindowDecoder(self.tokenizer, self.skip_special_tokens,
                                           self.emitted + self.pending, len(self.emitted))
            self.emitted = self.pending = []
        return self.fallback.finish()


def decode_stream_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` that ``DecodeStream`` can run on for ``tokenizer``, or None where the window
    method must be used: a slow tokenizer, a ``tokenizers`` without ``DecodeStream(ids=...)`` (before 0.22), or a
    ``decode`` that post-processes the backend's text (``clean_up_tokenization_spaces``), which a stream of deltas
    cannot reproduce."""
    if not _decode_stream_takes_ids():
        return None
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer) or not getattr(tokenizer, "is_fast", False):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and not _cleanup_skipped(tokenizer, backend):
        return None
    return backend


@functools.cache
def _decode_stream_takes_ids() -> bool:
    try:
        from tokenizers.decoders import DecodeStream

        DecodeStream(ids=[], skip_special_tokens=False)
    except (ImportError, TypeError):
        return False
    return True


def _cleanup_skipped(tokenizer: Any, backend: Any) -> bool:
    """Whether transformers (5 and later) skips ``clean_up_tokenization_spaces`` for this tokenizer anyway: it does
    for BPE models unless told to corrupt their output on purpose."""
    force = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
    return force is False and type(backend.model).__name__ == "BPE"


def _context(tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> list[int]:
    """The last prompt tokens, for the spacing of the first output tokens; none where they end inside a character
    (whose remaining bytes the output would otherwise complete, mixing prompt text into the output)."""
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    if context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith(_INCOMPLETE):
        return []
    return context


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool, stop: list[str],
        use_decode_stream: bool = True,
    ) -> None:
        """``use_decode_stream=False`` forces the window method (for comparisons; the results are the same)."""
        self.stops = StopMatcher(stop) if stop else None
        # the text decoded so far, and the part of it that may be shown: all but the last (longest stop string - 1)
        # characters, where a stop string could still begin, until the request ends (a stop string is not output)
        self._decoded = ""
        self._hold = self.stops.max_len - 1 if self.stops is not None else 0
        self.text = ""
        self.stop_reason: str | None = None
        context = _context(tokenizer, prompt_token_ids, skip_special_tokens)
        backend = decode_stream_backend(tokenizer) if use_decode_stream else None
        self._decoder: _Decoder = (
            _StreamDecoder(tokenizer, backend, skip_special_tokens, context) if backend is not None
            else _WindowDecoder(tokenizer, skip_special_tokens, context, len(context))
        )

    @property
    def uses_decode_stream(self) -> bool:
        return isinstance(self._decoder, _StreamDecoder) and self._decoder.fallback is None

    def add(self, new_token_ids: list[int]) -> str:
        """Feed new tokens; return the text they add to ``text``. After a stop string, ``stop_reason`` is set and the
        text is cut before it."""
        return self._append(self._decoder.step(new_token_ids), final=False)

    def flush(self) -> str:
        """At the end of a request: release the rest of the text, with the text held back for an incomplete
        character (as U+FFFD), as a full decode would show it."""
        if self.stop_reason is not None:
            return ""
        return self._append(self._decoder.finish(), final=True)

    def _append(self, delta: str, final: bool) -> str:
        before = len(self._decoded)
        self._decoded += delta
        hit = self.stops.find(self._decoded, before) if delta and self.stops is not None else None
        if hit is not None:
            index, self.stop_reason = hit
            self._decoded = self._decoded[:index]
            final = True
        shown = len(self._decoded) if final else max(len(self.text), len(self._decoded) - self._hold)
        new_text = self._decoded[len(self.text) : shown]
        self.text = self._decoded[:shown]
        return new_text
