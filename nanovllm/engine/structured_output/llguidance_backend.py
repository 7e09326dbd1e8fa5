"""llguidance (``structured_outputs_backend="llguidance"``): grammars as Earley parsers over the token trie, no compile
step, masks computed lazily per step; it also reads Lark grammars and enforces more of JSON Schema."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from nanovllm.sampling_params import StructuredOutputsParams


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The request's constraint in llguidance's own grammar format (a string)."""
    from llguidance import LLMatcher, grammar_from

    layout = {"whitespace_flexible": not spec.disable_any_whitespace}
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else {"type": "object"}
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=layout)
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return grammar_from("choice", json.dumps(spec.choice))
    assert spec.grammar is not None
    return grammar_from("ebnf" if "::=" in spec.grammar else "lark", spec.grammar)


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        import llguidance.hf

        # llguidance refuses stop tokens beyond the tokenizer's own vocabulary (a model padded past it, or a
        # benchmark pairing dummy weights with another model's tokenizer): those are left to the engine's EOS check
        stops = sorted(t for t in stop_token_ids if t < len(tokenizer)) or [tokenizer.eos_token_id]
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stops)
        self.words = (vocab_size + 31) // 32

    @staticmethod
    def validate(spec: StructuredOutputsParams) -> None:
        from llguidance import LLMatcher

        try:
            error = LLMatcher.validate_grammar(grammar_text(spec))
        except Exception as exc:  # noqa: BLE001 - a grammar the converter cannot read at all
            error = str(exc)
        if error:
            raise ValueError(f"structured_outputs.{spec.kind}: {error}")

    def compile(self, spec: StructuredOutputsParams) -> str:
        self.validate(spec)
        return grammar_text(spec)

    def matcher(self, compiled: str) -> "LLGuidanceMatcher":
        return LLGuidanceMatcher(self.tokenizer, compiled)


class LLGuidanceMatcher:
    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher

        self._matcher = LLMatcher(tokenizer, grammar)

    def accept(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask, row)  # a stopped matcher allows its stop tokens only

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()
