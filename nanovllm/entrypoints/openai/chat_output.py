"""What a chat choice's text becomes: reasoning, content and tool calls, whole or as stream deltas.

``tool_choice`` decides how tool calls are found:
- ``auto``: the model's own format, by the server's ``--tool-call-parser`` (``tool_parsers.py``);
- ``required``: the output is constrained (a grammar) to a JSON array of ``{"name", "parameters"}`` objects, one
  per call, each valid against its function's parameters; every element is a call;
- a named function: the output is constrained to that function's parameters; it is the one call's arguments;
- ``none`` (or no tools): plain content.
A reasoning parser (``--reasoning-parser``) first takes the thinking out; tool calls come from what is left.
Forced calls (``required``, named) are reported when the output is complete, whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nanovllm.entrypoints.openai.reasoning_parsers import ReasoningParser
from nanovllm.entrypoints.openai.tool_parsers import StreamDelta, ToolCall, ToolParser, new_tool_call_id
from nanovllm.sampling_params import StructuredOutputsParams


@dataclass
class ToolMode:
    """How one request's tool calls are produced: ``kind`` is none, auto, required or named."""

    kind: str
    parser: ToolParser | None = None  # auto
    function: str | None = None  # named
    single: bool = False  # required without parallel_tool_calls: at most one call

    def constraint(self, tools: list[dict[str, Any]]) -> StructuredOutputsParams | None:
        """The grammar that forces the calls (required, named), from the functions' parameter schemas."""
        functions = {tool["function"]["name"]: tool["function"] for tool in tools}
        if self.kind == "named":
            return StructuredOutputsParams(json=_parameters(functions[self.function]), disable_any_whitespace=True)
        if self.kind != "required":
            return None
        call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                           "properties": {"name": {"const": name}, "parameters": _parameters(function)}}
                          for name, function in functions.items()]}
        calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if self.single:
            calls["maxItems"] = 1
        return StructuredOutputsParams(json=calls, disable_any_whitespace=True)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


@dataclass
class ChoiceResult:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class ChoiceDelta:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[StreamDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChoiceParser:
    """One choice's text, whole (``result``) or delta by delta (``feed``, then ``finish``)."""

    def __init__(self, mode: ToolMode, reasoning: ReasoningParser | None) -> None:
        self.mode = mode
        self.reasoning = reasoning
        self._reasoning_stream = reasoning.streamer() if reasoning is not None else None
        self._tool_stream = mode.parser.streamer() if mode.kind == "auto" else None
        self._forced_text: list[str] = []  # required / named: the whole output, parsed at the end
        self.num_calls = 0

    def result(self, text: str) -> ChoiceResult:
        reasoning, content = self.reasoning.extract(text) if self.reasoning is not None else (None, text or None)
        if self.mode.kind == "auto" and content is not None:
            extracted = self.mode.parser.extract(content)
            return ChoiceResult(reasoning, extracted.content, extracted.tool_calls)
        if self.mode.kind in ("required", "named"):
            calls = self._forced_calls(content or "")
            if calls is not None:
                return ChoiceResult(reasoning, None, calls)
        return ChoiceResult(reasoning, content, [])

    def feed(self, text: str) -> ChoiceDelta:
        return self._route(self._reasoning_stream.feed(text) if self._reasoning_stream else [(None, text)], False)

    def finish(self) -> ChoiceDelta:
        delta = self._route(self._reasoning_stream.finish() if self._reasoning_stream else [], True)
        if self.mode.kind in ("required", "named"):
            calls = self._forced_calls("".join(self._forced_text))
            if calls is None:  # not the constrained output (cut short by max_tokens): plain content
                delta.content = (delta.content or "") + "".join(self._forced_text) or None
            else:
                delta.tool_calls += [StreamDelta(tool_call_index=i, tool_call_id=call.id, name=call.name,
                                                 arguments=call.arguments) for i, call in enumerate(calls)]
                self.num_calls += len(calls)
        return delta

    def _route(self, pieces: list[tuple[str | None, str | None]], final: bool) -> ChoiceDelta:
        delta = ChoiceDelta()
        for reasoning, content in pieces:
            if reasoning:
                delta.reasoning = (delta.reasoning or "") + reasoning
            if content and self.mode.kind in ("required", "named"):
                self._forced_text.append(content)
            elif content and self._tool_stream is not None:
                self._add(delta, self._tool_stream.feed(content))
            elif content:
                delta.content = (delta.content or "") + content
        if final and self._tool_stream is not None:
            self._add(delta, self._tool_stream.finish())
        return delta

    def _add(self, delta: ChoiceDelta, pieces: list[StreamDelta]) -> None:
        for piece in pieces:
            if piece.content:
                delta.content = (delta.content or "") + piece.content
            if piece.tool_call_index is not None:
                delta.tool_calls.append(piece)
                self.num_calls += 1

    def _forced_calls(self, text: str) -> list[ToolCall] | None:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.mode.kind == "named":
            return [ToolCall(new_tool_call_id(), self.mode.function, json.dumps(value, ensure_ascii=False))]
        if not isinstance(value, list):
            return None
        return [ToolCall(new_tool_call_id(), call["name"], json.dumps(call.get("parameters", {}), ensure_ascii=False))
                for call in value if isinstance(call, dict) and isinstance(call.get("name"), str)]
