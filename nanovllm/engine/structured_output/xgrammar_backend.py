"""xgrammar (the default backend): grammars compiled once per tokenizer into token-mask caches, fast per step."""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from nanovllm.sampling_params import StructuredOutputsParams

# A string of bounded length as xgrammar 0.2.9 compiles it admits raw control characters (invalid JSON) and no
# escapes; the same bounds as a pattern of plain characters admit valid JSON only.
_PLAIN_CHARS = '[^"\\\\\\x00-\\x1f]'

# Native threads that fill a step's bitmask rows and advance its matchers. A row of a JSON schema takes a few
# microseconds, less than handing it to a thread: on a 16-core host (H100 machine, 128 rows of bench throughput's
# schema, ``python -m nanovllm.benchmarks.grammar_step --batch-threads N``) xgrammar's default of half the cores
# took 1.29 ms a step to fill them, one thread 0.49 ms.
BATCH_THREADS = 1


def _safe_strings(schema: Any) -> Any:
    """``schema`` with every length-bounded plain string rewritten as a pattern of plain characters."""
    if isinstance(schema, list):
        return [_safe_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _safe_strings(value) for key, value in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & out.keys():
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_PLAIN_CHARS}{{{low},{high}}}$"
    return out


def _choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)  # EBNF strings escape as JSON's do


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int]) -> None:
        import xgrammar as xgr

        # the grammar's vocabulary is the tokenizer's, not the model's padded one: xgrammar counts every id without
        # text as a special token, and its accept_token slows with their number (73 against 5.5 us a token with
        # SmolLM2's 49,152 tokens under a 151,936-row head). Ids past it are never allowed (``apply_token_bitmask``).
        grammar_vocab = min(vocab_size, max(tokenizer.get_vocab().values()) + 1)
        stops = sorted(t for t in stop_token_ids if t < grammar_vocab)  # the others are left to the engine's EOS check
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=grammar_vocab, stop_token_ids=stops or None)
        # xgrammar reads added special tokens (<|im_start|>, ...) as their text, so a JSON string could hold one:
        # give them no text, so that no grammar ever allows them
        vocab = list(info.decoded_vocab)
        for token_id in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) - set(stop_token_ids):
            if token_id < len(vocab):
                vocab[token_id] = b""
        self.tokenizer_info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, info.dump_metadata())
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=2)
        self.words = (grammar_vocab + 31) // 32  # int32 words of a bitmask row
        self._batch = xgr.BatchGrammarMatcher(BATCH_THREADS)

    @staticmethod
    def validate(spec: StructuredOutputsParams) -> None:
        """Compile without a tokenizer (cheap), so that a bad schema is a ValueError before the request is queued."""
        import xgrammar as xgr

        try:
            _grammar(xgr.Grammar, spec)
        except RuntimeError as exc:
            raise ValueError(f"structured_outputs.{spec.kind}: {_reason(exc)}") from None

    def compile(self, spec: StructuredOutputsParams) -> Any:
        try:
            return _grammar(self.compiler, spec)
        except RuntimeError as exc:
            raise ValueError(f"structured_outputs.{spec.kind}: {_reason(exc)}") from None

    def matcher(self, compiled: Any) -> "XGrammarMatcher":
        return XGrammarMatcher(compiled)

    def fill_bitmask(self, matchers: list["XGrammarMatcher"], bitmask: np.ndarray) -> None:
        """Row ``i`` of ``bitmask`` from ``matchers[i]``; a terminated matcher's row is left as it is (its request
        is over and the row discarded)."""
        live = [row for row, matcher in enumerate(matchers) if not matcher.native.is_terminated()]
        if live:
            self._batch.batch_fill_next_token_bitmask([matchers[row].native for row in live], bitmask, live)

    def accept_tokens(self, matchers: list["XGrammarMatcher"], tokens: list[int]) -> list[bool]:
        return self._batch.batch_accept_token([matcher.native for matcher in matchers], tokens)


def _grammar(builder: Any, spec: StructuredOutputsParams) -> Any:
    """The same calls build a ``Grammar`` (class methods) or a ``CompiledGrammar`` (a compiler's methods)."""
    compact = spec.disable_any_whitespace
    options = {"any_whitespace": not compact, "separators": (",", ":") if compact else None}
    if spec.json is not None:
        schema = _safe_strings(copy.deepcopy(spec.json)) if isinstance(spec.json, dict) else spec.json
        return _call(builder, "json_schema", json.dumps(schema), **options)
    if spec.json_object:
        return _call(builder, "json_schema", json.dumps({"type": "object"}), strict_mode=False, **options)
    if spec.regex is not None:
        return _call(builder, "regex", spec.regex)
    text = _choice_grammar(spec.choice) if spec.choice is not None else spec.grammar
    return _call(builder, "grammar", text)


def _call(builder: Any, kind: str, text: str, **options: Any) -> Any:
    if isinstance(builder, type):  # xgr.Grammar: from_json_schema / from_regex / from_ebnf
        return getattr(builder, {"grammar": "from_ebnf"}.get(kind, f"from_{kind}"))(text, **options)
    return getattr(builder, f"compile_{kind}")(text, **options)


def _reason(exc: RuntimeError) -> str:
    """xgrammar's message without the C++ source location in front of it."""
    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return message.split(": ", 1)[-1] if message.startswith("[") else message


class XGrammarMatcher:
    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        # terminated as soon as nothing can follow, with or without the stop token (as llguidance does)
        self.native = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)

    def is_terminated(self) -> bool:
        return self.native.is_terminated()
