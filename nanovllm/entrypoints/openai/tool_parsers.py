"""Tool calls in a model's text output, as OpenAI returns them: the `--tool-call-parser` formats of vLLM.

Pure text in, typed values out: nothing here knows about HTTP, tokenizers or the engine. The chat handler picks a
parser by name from ``TOOL_PARSERS``, calls ``extract`` on a whole output, or feeds a per-request ``streamer()``
the text deltas of a streamed one.

Formats:

- ``hermes`` (Qwen2.5, Qwen3, Hermes): any number of ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  blocks, with text before, between and after them.
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calls): the output is ``{"name": ..., "parameters": {...}}`` (or
  ``"arguments"``), optionally after ``<|python_tag|>``, several objects separated by ``;``. Calls are recognised
  only at the start of the output, as Llama's template asks for them; text after the last call is content.

Decisions, the same in both modes:

- Arguments are normalised to ``json.dumps(arguments, ensure_ascii=False)`` (what vLLM returns): whatever spacing
  or escapes the model used, a client gets one canonical JSON object. ``"arguments"`` may also be spelled
  ``"parameters"``, be missing or null (``{}``), or be a string holding a JSON object (decoded). JSON is read
  leniently where it costs nothing (raw control characters in strings are accepted and re-escaped) and strictly
  where the result would be invalid JSON (``NaN``, ``Infinity`` and numbers that overflow to infinity are refused).
- A call that does not parse (invalid JSON, no string ``name``, arguments that are not an object, a block that never
  closes) is not a call: its text stays in ``content``, verbatim. Nothing raises, nothing is lost.
- ``content`` is the text outside the calls, verbatim (separators included), or ``None`` when that is empty or
  only whitespace. Exception: in ``llama3_json`` the ``<|python_tag|>`` and the separators between and after calls
  are part of the call syntax, not content.
- Ids are ``chatcmpl-tool-`` and 32 random hex digits (vLLM's spelling), fresh for every call.

Streaming: a call is announced only once it is known to be well formed, i.e. when its closing marker (hermes) or
closing brace (llama3_json) arrives and it parses. It then comes as one ``StreamDelta`` carrying index, id, name and
the whole arguments string. Streaming argument fragments earlier would be faster to watch, but a call cut off by
``max_tokens`` could then not be taken back, and the stream would disagree with the non-streamed result. Text that
might still turn into a call (a partial ``<tool_c``, an open block, the start of a llama3 object) is held back until
decided; whitespace-only content is held until some non-whitespace content follows. Hence, for any split of an
output into deltas, the deltas merge (``merge_deltas``) into exactly what ``extract`` returns, ids aside.
"""
from __future__ import annotations

import json
import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

# ----------------------------------------------------------------------------------------------- the values


@dataclass
class ToolCall:
    """One function call, as in OpenAI's ``message.tool_calls[i]`` (``arguments`` is a JSON object, as text)."""
    id: str
    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    """A whole output split into its text (None when empty or whitespace-only) and its tool calls, in order."""
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    """One piece of a streamed output: either content text or (a part of) the tool call at ``tool_call_index``.

    Shaped like OpenAI's ``delta.tool_calls`` items: the first delta of a call carries its index, id and name; later
    ones (this module sends none, but a consumer should accept them) carry the index and more argument text.
    """
    content: str | None = None
    tool_call_index: int | None = None
    tool_call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


def new_tool_call_id() -> str:
    """A fresh id, in vLLM's spelling; random rather than counted so that ids never repeat across requests."""
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


def merge_deltas(deltas: Iterable[StreamDelta]) -> ExtractedToolCalls:
    """Put streamed deltas back together, as a client does: content concatenated, argument fragments per index."""
    content: list[str] = []
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta.content is not None:
            content.append(delta.content)
        if delta.tool_call_index is None:
            continue
        call = calls.get(delta.tool_call_index)
        if call is None:
            calls[delta.tool_call_index] = ToolCall(delta.tool_call_id or "", delta.name or "", delta.arguments or "")
        else:
            call.arguments += delta.arguments or ""
    return ExtractedToolCalls(_content_or_none("".join(content)), [calls[i] for i in sorted(calls)])


# ----------------------------------------------------------------------------------------- text and JSON helpers

_JSON_WS = " \t\n\r"  # the whitespace JSON allows between tokens (and all that Python's decoder skips)
_INVALID = -1  # what _JsonObjectEnd.scan returns when the text cannot be a JSON object


def _content_or_none(text: str) -> str | None:
    return text if text.strip() else None


def _skip(text: str, i: int, chars: str = _JSON_WS) -> int:
    """The first index at or after ``i`` whose character is not one of ``chars``."""
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker`` (text to hold back)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: json.dumps would write Infinity, which is not JSON
        raise ValueError(f"number out of range: {text}")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# strict=False: a model that writes a raw newline inside a string meant one; json.dumps escapes it again.
_DECODER = json.JSONDecoder(strict=False, parse_float=_finite_float, parse_constant=_refuse_constant)


def _decode_at(text: str, start: int) -> tuple[Any, int] | None:
    """The JSON value that begins at ``text[start]`` and the index where it ends, or None if there is none."""
    try:
        return _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; RecursionError: absurd nesting
        return None


def _normalise_arguments(arguments: Any) -> str | None:
    """The canonical JSON text of a call's arguments, or None when they are not a JSON object."""
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string holding the object
        decoded = _decode_at(arguments, _skip(arguments, 0))
        if decoded is None or _skip(arguments, decoded[1]) != len(arguments):
            return None
        arguments = decoded[0]
    if not isinstance(arguments, dict):
        return None
    try:
        text = json.dumps(arguments, ensure_ascii=False)
        text.encode("utf-8")
    except RecursionError:
        return None
    except UnicodeEncodeError:  # a lone surrogate (half an escaped emoji): keep the call, escape it instead
        text = json.dumps(arguments)
    return text


def _call_fields(obj: Any) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a decoded call object, or None when it is not a well-formed call."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    arguments = _normalise_arguments(obj["arguments"] if "arguments" in obj else obj.get("parameters"))
    return None if arguments is None else (name, arguments)


def _call_at(text: str, start: int) -> tuple[tuple[str, str], int] | None:
    """The call whose JSON object begins at ``text[start]``, with the index where the object ends."""
    decoded = _decode_at(text, start)
    if decoded is None:
        return None
    fields = _call_fields(decoded[0])
    return None if fields is None else (fields, decoded[1])


class _JsonObjectEnd:
    """Finds where a JSON object ends while its text is still arriving, reading each character once.

    It follows strings (and their escapes) and brackets only; ``scan`` answers the end index once the brackets
    balance (the caller then decodes the object for real), ``None`` while they do not, and ``_INVALID`` as soon as
    a character appears that no JSON text can have there, so that a stream need not wait for the end of the output
    to give up on, say, ``<tool_call> tags`` in prose. For valid JSON its end is exactly ``raw_decode``'s.
    """
    _OUTSIDE_STRINGS = frozenset(_JSON_WS + '{}[],:"-+.0123456789eEtrufalsn')
    _OPENER = {"}": "{", "]": "["}

    def __init__(self, start: int) -> None:
        self._pos = start  # the caller guarantees text[start] == "{"
        self._open: list[str] = []
        self._in_string = False
        self._escaped = False
        self._result: int | None = None  # once decided, the answer for good

    def scan(self, text: str) -> int | None:
        """``text`` is the text seen before with more appended (or the same text, after a decision)."""
        if self._result is None:
            self._result = self._scan(text)
        return self._result

    def _scan(self, text: str) -> int | None:
        for pos in range(self._pos, len(text)):
            char = text[pos]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._open.append(char)
            elif char in "}]":
                if not self._open or self._open.pop() != self._OPENER[char]:
                    return _INVALID
                if not self._open:
                    return pos + 1
            elif char not in self._OUTSIDE_STRINGS:
                return _INVALID
        self._pos = len(text)
        return None


# ----------------------------------------------------------------------------------------------- the interface


class ToolCallStreamer(ABC):
    """Turns one streamed output into ``StreamDelta``s: ``feed`` each text delta, then ``finish`` once.

    The subclass reads ``_buf``, the text not decided yet, and each ``_advance`` decides one more piece of it
    (content, a call, or a change of state); ``feed`` and ``finish`` advance until nothing more can be decided.
    """

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._buf = ""
        self._out: list[StreamDelta] = []
        self._calls = 0
        self._held_whitespace = ""  # content so far, while all of it is whitespace
        self._content_started = False
        self._finished = False

    def feed(self, delta_text: str) -> list[StreamDelta]:
        """The deltas that ``delta_text`` (the next piece of the output) makes certain."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        return self._drain(final=False)

    def finish(self) -> list[StreamDelta]:
        """The deltas for what was held back, now that the output is complete (open calls become content)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[StreamDelta]:
        while self._advance(final):
            pass
        out, self._out = self._out, []
        return out

    @abstractmethod
    def _advance(self, final: bool) -> bool:
        """Decide the next piece of ``_buf``; False when nothing more can be decided until more text (or ever)."""

    def _take_content(self, length: int) -> None:
        """The first ``length`` characters of ``_buf`` are content: send them (unless whitespace so far)."""
        text, self._buf = self._buf[:length], self._buf[length:]
        if not self._content_started:
            self._held_whitespace += text
            if not self._held_whitespace.strip():
                return
            text, self._held_whitespace, self._content_started = self._held_whitespace, "", True
        if not text:
            return
        if self._out and self._out[-1].content is not None:  # one content delta per feed, not one per decision
            self._out[-1].content += text
        else:
            self._out.append(StreamDelta(content=text))

    def _take_call(self, fields: tuple[str, str], length: int) -> None:
        """The first ``length`` characters of ``_buf`` are the call ``fields``: announce it whole."""
        name, arguments = fields
        self._out.append(StreamDelta(tool_call_index=self._calls, tool_call_id=self._new_id(), name=name,
                                     arguments=arguments))
        self._calls += 1
        self._buf = self._buf[length:]


class ToolParser(ABC):
    """One model family's tool-call format. Holds no per-request state: one instance can serve every request."""
    name: ClassVar[str]  # the --tool-call-parser name
    tool_call_start: ClassVar[str]  # the text that opens a call (llama3_json: also a bare "{" at the start)
    tool_call_end: ClassVar[str] = ""  # the text that closes one, where the format has such a marker

    def __init__(self, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._new_id = new_id  # tests pass a counter, to compare results whole

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls:
        """The tool calls of a complete output and the text around them."""

    @abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A fresh streamer for one streamed output."""

    def _calls(self, fields: list[tuple[str, str]]) -> list[ToolCall]:
        return [ToolCall(self._new_id(), name, arguments) for name, arguments in fields]


# ---------------------------------------------------------------------------------------------------- hermes


class HermesToolParser(ToolParser):
    """``<tool_call>{json}</tool_call>`` blocks anywhere in the text (Qwen2.5, Qwen3, Hermes 2/3).

    A block is a call when, after ``<tool_call>`` and optional whitespace, a JSON object that is a call follows and
    then, after optional whitespace, ``</tool_call>``. The object is read as JSON, so a ``</tool_call>`` or a brace
    inside one of its strings is just text. A ``<tool_call>`` that does not open such a block is ordinary text, and
    the search for calls goes on right after it.
    """
    name = "hermes"
    tool_call_start = "<tool_call>"
    tool_call_end = "</tool_call>"

    def extract(self, text: str) -> ExtractedToolCalls:
        content: list[str] = []
        fields: list[tuple[str, str]] = []
        taken = search = 0  # text[:taken] is decided; calls are looked for from text[search:]
        while (start := text.find(self.tool_call_start, search)) != -1:
            block = self.block_at(text, start)
            if block is None:
                search = start + len(self.tool_call_start)
                continue
            content.append(text[taken:start])
            fields.append(block[0])
            taken = search = block[1]
        content.append(text[taken:])
        return ExtractedToolCalls(_content_or_none("".join(content)), self._calls(fields))

    @classmethod
    def block_at(cls, text: str, start: int) -> tuple[tuple[str, str], int] | None:
        """The call of the block that opens at ``text[start]`` and the index after its end, or None."""
        call = _call_at(text, _skip(text, start + len(cls.tool_call_start)))
        if call is None:
            return None
        end = _skip(text, call[1])
        if not text.startswith(cls.tool_call_end, end):
            return None
        return call[0], end + len(cls.tool_call_end)

    def streamer(self) -> ToolCallStreamer:
        return _HermesStreamer(self._new_id)


class _HermesStreamer(ToolCallStreamer):
    """Text until a ``<tool_call>`` (a partial one held back); then the block, until it is a call or is not."""
    START, END = HermesToolParser.tool_call_start, HermesToolParser.tool_call_end

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self._in_block = False  # _buf starts with START and the block is not decided yet
        self._json_end: _JsonObjectEnd | None = None

    def _advance(self, final: bool) -> bool:
        return self._advance_block(final) if self._in_block else self._advance_text(final)

    def _advance_text(self, final: bool) -> bool:
        start = self._buf.find(self.START)
        if start == -1:
            held = 0 if final else _partial_marker_len(self._buf, self.START)
            self._take_content(len(self._buf) - held)
            return False
        self._take_content(start)
        self._in_block, self._json_end = True, None
        return True

    def _advance_block(self, final: bool) -> bool:
        outcome = self._block_outcome(final)
        if outcome == "open":
            return False
        if outcome == "malformed":  # the marker is text; look for calls right after it
            self._take_content(len(self.START))
        else:
            self._take_call(*outcome)
        self._in_block = False
        return True

    def _block_outcome(self, final: bool) -> str | tuple[tuple[str, str], int]:
        """``"open"`` (undecided), ``"malformed"``, or the block's call and length, as ``block_at`` decides."""
        buf = self._buf
        first = _skip(buf, len(self.START))
        if first == len(buf):
            return "malformed" if final else "open"
        if buf[first] != "{":
            return "malformed"
        if self._json_end is None:
            self._json_end = _JsonObjectEnd(first)
        end = self._json_end.scan(buf)
        if end == _INVALID or (end is None and final):
            return "malformed"
        if end is None:
            return "open"
        after = _skip(buf, end)
        if buf.startswith(self.END, after):
            block = HermesToolParser.block_at(buf, 0)
            return "malformed" if block is None else block
        if not final and self.END.startswith(buf[after:]):
            return "open"
        return "malformed"


# ------------------------------------------------------------------------------------------------ llama3_json


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2 JSON calls: ``[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]*`` at the start.

    The calls are the longest run of well-formed call objects at the start of the output (after whitespace and an
    optional ``<|python_tag|>``), separated by ``;`` and whitespace. Without any, the whole output is content,
    verbatim (a plain answer, a JSON answer without ``name``, or ``<|python_tag|>`` code for the built-in tools).
    With some, the text after the last call and its separators is content.
    """
    name = "llama3_json"
    tool_call_start = "<|python_tag|>"
    SEPARATORS = _JSON_WS + ";"

    def extract(self, text: str) -> ExtractedToolCalls:
        pos = self.calls_start(text)
        fields: list[tuple[str, str]] = []
        while pos < len(text) and text[pos] == "{" and (call := _call_at(text, pos)) is not None:
            fields.append(call[0])
            pos = _skip(text, call[1], self.SEPARATORS)
        rest = text[pos:] if fields else text
        return ExtractedToolCalls(_content_or_none(rest), self._calls(fields))

    @classmethod
    def calls_start(cls, text: str) -> int:
        """Where the first call object would begin: after leading whitespace and ``<|python_tag|>``."""
        pos = _skip(text, 0)
        if text.startswith(cls.tool_call_start, pos):
            pos = _skip(text, pos + len(cls.tool_call_start))
        return pos

    def streamer(self) -> ToolCallStreamer:
        return _Llama3JsonStreamer(self._new_id)


class _Llama3JsonStreamer(ToolCallStreamer):
    """States: ``start`` (is this output calls?), ``object`` (one arriving), ``between`` (separators), ``content``.

    Until the first call is decided nothing is sent and ``_buf`` holds the whole output, which becomes content
    as it stands if that first object is not a call.
    """
    TAG = Llama3JsonToolParser.tool_call_start

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self._state = "start"
        self._object_start = 0  # where in _buf the object of state "object" begins
        self._json_end: _JsonObjectEnd | None = None

    def _advance(self, final: bool) -> bool:
        if self._state == "start":
            return self._advance_start(final)
        if self._state == "object":
            return self._advance_object(final)
        if self._state == "between":
            return self._advance_between(final)
        self._take_content(len(self._buf))
        return False

    def _advance_start(self, final: bool) -> bool:
        pos = _skip(self._buf, 0)
        if not final and self.TAG.startswith(self._buf[pos:]):
            return False  # nothing yet, or part of the tag
        pos = Llama3JsonToolParser.calls_start(self._buf)
        if pos == len(self._buf) and not final:
            return False
        if pos < len(self._buf) and self._buf[pos] == "{":
            self._begin_object(pos)
        else:
            self._state = "content"
        return True

    def _advance_object(self, final: bool) -> bool:
        end = self._json_end.scan(self._buf)
        if end is None and not final:
            return False
        call = None if end is None or end == _INVALID else _call_at(self._buf, self._object_start)
        if call is None:  # before any call the whole output is content; after some, this object on
            if self._calls:
                self._buf = self._buf[self._object_start:]
            self._state = "content"
        else:
            self._take_call(call[0], call[1])
            self._state = "between"
        return True

    def _advance_between(self, final: bool) -> bool:
        pos = _skip(self._buf, 0, Llama3JsonToolParser.SEPARATORS)
        if pos == len(self._buf):
            if final:
                self._buf = ""  # separators after the last call are not content
            return False
        if self._buf[pos] == "{":
            self._begin_object(pos)
        else:
            self._buf, self._state = self._buf[pos:], "content"
        return True

    def _begin_object(self, pos: int) -> None:
        self._state, self._object_start, self._json_end = "object", pos, _JsonObjectEnd(pos)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}
