"""Reasoning output: a thinking model's reasoning told apart from its answer (`--reasoning-parser`).

Pure text in, typed values out. The chat handler picks a parser class by name from ``REASONING_PARSERS``, makes
one per request (``starts_in_reasoning`` depends on the rendered prompt), and calls ``extract`` on a whole output
or feeds a ``streamer()`` the text deltas of a streamed one. The reasoning goes to ``reasoning_content``, the rest
to ``content`` (where a tool parser may look for calls).

``qwen3``: the reasoning is the text inside ``<think>...</think>``. How the parser knows where the output starts:

- ``starts_in_reasoning=True``: the rendered prompt already opened ``<think>`` (Qwen3-2507 thinking models, or any
  template whose generation prompt ends with ``<think>``; ``prompt_opens_reasoning(prompt)`` tells), so the output
  begins inside the reasoning and only ``</think>`` appears.
- otherwise the output opens the reasoning itself with ``<think>`` as its first non-whitespace text (what Qwen3
  does with ``enable_thinking`` on). An output that does not start so is all content, verbatim, even if it
  mentions ``</think>`` later: with ``enable_thinking=false`` the template already closed an empty think block in
  the prompt, and the output is the answer alone. An output that opens with an empty ``<think>\\n\\n</think>`` has
  no reasoning (None).

An output that never closes its reasoning (cut off by ``max_tokens``) is all reasoning; content is None.

Whitespace, decided as Qwen3's own chat template does when it renders this message back into a later prompt (vLLM
strips nothing): the newlines that frame the reasoning (``<think>\\n...\\n</think>``) and the newlines after
``</think>`` are format, not text, and are dropped; everything else is verbatim. A part that is empty or only
whitespace is None.

Streaming: a partial ``<think>`` or ``</think>`` is held back until known; newlines that may turn out to be framing
(at the end of the reasoning so far, at the start of either part) and whitespace-only parts are held until text
follows. Hence the deltas of any split of an output concatenate, per part, to exactly what ``extract`` returns.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple


class ReasoningResult(NamedTuple):
    """A whole output split in two; each part None when it is empty or only whitespace."""
    reasoning: str | None
    content: str | None


class ReasoningDelta(NamedTuple):
    """One piece of a streamed output: exactly one of the two is set, never to an empty string."""
    reasoning: str | None
    content: str | None


def _part_or_none(text: str) -> str | None:
    return text if text.strip() else None


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker`` (text to hold back)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningStreamer(ABC):
    """Splits one streamed output: ``feed`` each text delta, then ``finish`` once."""

    @abstractmethod
    def feed(self, delta_text: str) -> list[ReasoningDelta]:
        """The deltas that ``delta_text`` (the next piece of the output) makes certain, in output order."""

    @abstractmethod
    def finish(self) -> list[ReasoningDelta]:
        """The deltas for what was held back, now that the output is complete."""


class ReasoningParser(ABC):
    """One model family's reasoning format, for one request (``starts_in_reasoning`` depends on its prompt)."""
    name: ClassVar[str]  # the --reasoning-parser name

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self.starts_in_reasoning = starts_in_reasoning

    @classmethod
    @abstractmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        """Whether a rendered prompt leaves the reasoning open, so the output starts inside it."""

    @abstractmethod
    def extract(self, text: str) -> ReasoningResult:
        """The reasoning and the content of a complete output."""

    @abstractmethod
    def streamer(self) -> ReasoningStreamer:
        """A fresh streamer for one streamed output."""


class Qwen3ReasoningParser(ReasoningParser):
    """``<think>reasoning</think>content``; see the module's docstring for where the output starts."""
    name = "qwen3"
    START, END = "<think>", "</think>"

    @classmethod
    def prompt_opens_reasoning(cls, prompt: str) -> bool:
        # The generation prompt is the end of the rendered text: an open <think> there is the template's, whereas
        # one written in a user message is followed by the rest of the conversation.
        return prompt.rstrip().endswith(cls.START)

    def extract(self, text: str) -> ReasoningResult:
        if self.starts_in_reasoning:
            body = text
        else:
            opened = text.lstrip()
            if not opened.startswith(self.START):
                return ReasoningResult(None, _part_or_none(text))
            body = opened[len(self.START):]
        reasoning, closed, content = body.partition(self.END)
        return ReasoningResult(_part_or_none(reasoning.strip("\n")),
                               _part_or_none(content.lstrip("\n")) if closed else None)

    def streamer(self) -> ReasoningStreamer:
        return _Qwen3Streamer(self.starts_in_reasoning)


class _PartStream:
    """One part (reasoning or content) sent as it arrives, normalised exactly as ``extract`` normalises it.

    Leading newlines are dropped when ``strip_leading_newlines``; trailing ones are held while more may follow
    and dropped at the end when ``strip_trailing_newlines``; nothing is sent while the part is only whitespace.
    """

    def __init__(self, strip_leading_newlines: bool, strip_trailing_newlines: bool) -> None:
        self._strip_leading = strip_leading_newlines
        self._strip_trailing = strip_trailing_newlines
        self._pending = ""  # received, not sent
        self._started = False  # whether some non-whitespace text was sent

    def push(self, text: str) -> str:
        """Take the part's next text; return what can be sent now."""
        if self._strip_leading:
            text = text.lstrip("\n")
            self._strip_leading = not text
        self._pending += text
        if not self._started and not self._pending.strip():
            return ""
        self._started = True
        held = len(self._pending) - len(self._pending.rstrip("\n")) if self._strip_trailing else 0
        out, self._pending = self._pending[:len(self._pending) - held], self._pending[len(self._pending) - held:]
        return out

    # What is still pending at the end is only whitespace (never started) or only trailing newlines: both dropped,
    # so the part needs no closing call.


class _Qwen3Streamer(ReasoningStreamer):
    """States: ``start`` (does the output open with <think>?), ``reasoning`` (until </think>), ``content``."""
    START, END = Qwen3ReasoningParser.START, Qwen3ReasoningParser.END

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""  # text not assigned to a part yet
        self._reasoning = _PartStream(strip_leading_newlines=True, strip_trailing_newlines=True)
        self._content = _PartStream(strip_leading_newlines=False, strip_trailing_newlines=False)
        self._out: list[ReasoningDelta] = []
        self._finished = False

    def feed(self, delta_text: str) -> list[ReasoningDelta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        return self._drain(final=False)

    def finish(self) -> list[ReasoningDelta]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[ReasoningDelta]:
        while self._advance(final):
            pass
        out, self._out = self._out, []
        return out

    def _advance(self, final: bool) -> bool:
        """Assign the next piece of ``_buf``; False when nothing more can be assigned until more text arrives."""
        if self._state == "start":
            return self._advance_start(final)
        if self._state == "reasoning":
            return self._advance_reasoning(final)
        self._send(self._content, self._buf, is_reasoning=False)
        self._buf = ""
        return False

    def _advance_start(self, final: bool) -> bool:
        opened = self._buf.lstrip()
        if opened.startswith(self.START):
            self._buf, self._state = opened[len(self.START):], "reasoning"
        elif final or not self.START.startswith(opened):
            self._state = "content"
        else:
            return False  # nothing yet but whitespace, or part of <think>
        return True

    def _advance_reasoning(self, final: bool) -> bool:
        end = self._buf.find(self.END)
        if end == -1:
            held = 0 if final else _partial_marker_len(self._buf, self.END)
            self._send(self._reasoning, self._buf[:len(self._buf) - held], is_reasoning=True)
            self._buf = self._buf[len(self._buf) - held:]
            return False
        self._send(self._reasoning, self._buf[:end], is_reasoning=True)
        self._buf, self._state = self._buf[end + len(self.END):], "content"
        self._content = _PartStream(strip_leading_newlines=True, strip_trailing_newlines=False)
        return True

    def _send(self, part: _PartStream, text: str, is_reasoning: bool) -> None:
        out = part.push(text)
        if out:
            self._out.append(ReasoningDelta(out, None) if is_reasoning else ReasoningDelta(None, out))


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    Qwen3ReasoningParser.name: Qwen3ReasoningParser,
}
