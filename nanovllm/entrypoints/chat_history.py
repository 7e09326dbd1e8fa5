"""The conversation of ``nanovllm chat``, fitted to the context before each reply.

A conversation grows by a user message and a reply per turn, and the engine takes a prompt only while prompt plus
``max_tokens`` fits the context (``max_model_len``, and the KV pool). So before each reply the oldest turns go, one
at a time (a turn is a user message and what follows it up to the next one; the system message stays), until the
rest and ``max_tokens`` fit; when the newest message alone leaves less room than ``max_tokens``, the reply is
capped to the room there is. Only a newest message that leaves no room at all cannot be sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

Message = dict[str, Any]


class MessageTooLong(ValueError):
    """The newest message (with the system message) leaves no room for a reply."""


class LengthLimit(Protocol):
    """What the engine's intake admits (``InputProcessor``): a prompt plus max_tokens of at most
    ``max_request_tokens``, or a ``ValueError`` from ``check_length`` naming the limit."""

    @property
    def max_request_tokens(self) -> int: ...

    def check_length(self, num_prompt: int, max_tokens: int) -> None: ...


@dataclass(frozen=True)
class FittedChat:
    messages: list[Message]  # the conversation to keep: system message, the newest turns, the new user message
    prompt_ids: list[int]  # ``messages`` rendered
    max_tokens: int  # the reply's budget: the one asked for, or less when that is all the room there is
    dropped_turns: int  # how many of the oldest turns were left out


def fit_conversation(
    messages: list[Message], render: Callable[[list[Message]], list[int]], limit: LengthLimit, max_tokens: int,
) -> FittedChat:
    """Drop the oldest turns of ``messages`` (whose last one is the new user message) until the rendered prompt
    plus ``max_tokens`` passes ``limit``, then cap ``max_tokens`` to the room left.

    ``render`` turns messages into prompt token ids; a ``ValueError`` from it (a text too long to tokenize within
    the context) counts as not fitting."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the conversation must end with the new user message")
    head = [m for m in messages[:1] if m.get("role") == "system"]
    body = messages[len(head):]
    dropped = 0
    while True:
        kept = head + body
        try:
            ids: list[int] | None = render(kept)
        except ValueError as exc:
            ids, refusal = None, exc
        if ids is not None and (refusal := _refusal(limit, len(ids), max_tokens)) is None:
            return FittedChat(kept, ids, max_tokens, dropped)
        if len(body) > 1:  # an older turn is left: drop it (the user message and the replies after it)
            body = _without_oldest_turn(body)
            dropped += 1
            continue
        if ids is not None and (refusal := _refusal(limit, len(ids), 1)) is None:
            return FittedChat(kept, ids, limit.max_request_tokens - len(ids), dropped)
        raise MessageTooLong(f"this message (with the system prompt) leaves no room for a reply: {refusal}")


def _refusal(limit: LengthLimit, num_prompt: int, max_tokens: int) -> ValueError | None:
    try:
        limit.check_length(num_prompt, max_tokens)
    except ValueError as exc:
        return exc
    return None


def _without_oldest_turn(body: list[Message]) -> list[Message]:
    nxt = next((i for i in range(1, len(body)) if body[i].get("role") == "user"), len(body) - 1)
    return body[nxt:]
