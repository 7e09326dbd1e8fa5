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

        # the tokenizer's own ids, as the xgrammar backend: a head padded past them adds bitmask words that only
        # ever say no (the sampler refuses every id past the bitmask)
        grammar_vocab = min(vocab_size, max(tokenizer.get_vocab().values()) + 1)
        # llguidance refuses stop tokens beyond the tokenizer's own vocabulary (a model padded past it, or a
        # benchmark pairing dummy weights with another model's tokenizer): those are left to the engine's EOS check
        stops = sorted(t for t in stop_token_ids if t < grammar_vocab) or [tokenizer.eos_token_id]
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=grammar_vocab, eos_token=stops)
        self.words = (grammar_vocab + 31) // 32
        self._executor = llguidance.LLExecutor()

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

    def fill_bitmask(self, matchers: list["LLGuidanceMatcher"], bitmask: np.ndarray) -> None:
        """Row ``i`` of ``bitmask`` from ``matchers[i]``, on llguidance's thread pool (a stopped matcher allows its
        stop tokens only)."""
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self._executor, [(m.native, row) for row, m in enumerate(matchers)], bitmask)

    def accept_tokens(self, matchers: list["LLGuidanceMatcher"], tokens: list[int]) -> list[bool]:
        from llguidance.numpy import consume_token_par

        return consume_token_par(self._executor, [(m.native, token) for m, token in zip(matchers, tokens)])


class LLGuidanceMatcher:
    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher

        self.native = LLMatcher(tokenizer, grammar)

    def is_terminated(self) -> bool:
        return self.native.is_stopped()
