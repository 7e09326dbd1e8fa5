"""Per-request sampling settings, validated the way vLLM validates them."""
from __future__ import annotations

import reprlib
import json
from dataclasses import dataclass, field

# Any 64-bit integer is a seed, signed or not (as in vLLM); samples of an ``n > 1`` request derive their own.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Stop strings are matched on every generated token, so their number and size are bounded.
MAX_STOP_STRINGS = 128
MAX_STOP_CHARS = 16_384  # all stop strings together
MAX_STOP_TOKEN_IDS = 1024
# Logit controls (as in vLLM). Biases are OpenAI's range; bad words are matched on every generated token.
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100.0, 100.0
MAX_BAD_WORDS = 128
MAX_BAD_WORDS_CHARS = 16_384  # all bad words together


MAX_CHOICES = 1024
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar, as text


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, any JSON object, a regex, one of several strings, or a grammar (EBNF,
    as xgrammar reads it; llguidance reads Lark too). Exactly one is given; spelled as in vLLM."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # no free whitespace in JSON: shorter outputs

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, grammar or json_object, "
                             f"got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {_short(self.json)}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_GRAMMAR_CHARS):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string of at most "
                                 f"{MAX_GRAMMAR_CHARS} characters")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice or len(self.choice) > MAX_CHOICES
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
            self.choice = list(self.choice)
        if self.json is not None and len(json.dumps(self.json)) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured_outputs.json may have at most {MAX_GRAMMAR_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, name) not in (None, False))

    def key(self) -> str:
        """One string per distinct constraint: the grammar cache's key."""
        return json.dumps([self.kind, getattr(self, self.kind), self.disable_any_whitespace], sort_keys=True)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_k: int = -1  # -1 or 0: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top logprobs to return per generated token
    prompt_logprobs: int | None = None
    # added to the logits of these token ids before sampling (after penalties, before temperature and filters)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # never generated (as-is, or after a space)
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)
    # bad_words as token sequences; the input processor sets it on its copy of the params (it has the tokenizer)
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == 0:
            self.top_k = -1
        self._validate()
        self._validate_logit_controls()
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")

    def _validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}"[:300])
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop_strings)}")
        if sum(len(s) for s in self.stop_strings) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings may have at most {MAX_STOP_CHARS} characters in all")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}"[:300])
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                raise ValueError(f"{name} must be an integer in [0, 20], got {value}")

    def _validate_logit_controls(self) -> None:
        """Checks that need no model; the input processor checks the token ids against the vocabulary."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id to bias, got {type(self.logit_bias).__name__}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be non-negative integer token ids, got {_short(token)}")
                if (not isinstance(bias, (int, float)) or isinstance(bias, bool)
                        or not LOGIT_BIAS_MIN <= bias <= LOGIT_BIAS_MAX):  # also rejects NaN
                    raise ValueError(f"logit_bias values must be numbers in [{LOGIT_BIAS_MIN:g}, "
                                     f"{LOGIT_BIAS_MAX:g}], got {_short(bias)} for token {token}")
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got "
                                 f"{_short(self.allowed_token_ids)}")
            bad = [t for t in self.allowed_token_ids if not _is_int(t) or t < 0]
            if bad:
                raise ValueError(f"allowed_token_ids must be non-negative integers, got {_short(bad)}")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)):
                raise ValueError(f"bad_words must be a list of strings, got {type(self.bad_words).__name__}")
            if len(self.bad_words) > MAX_BAD_WORDS:
                raise ValueError(f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(self.bad_words)}")
            bad = [w for w in self.bad_words if not isinstance(w, str) or not w.strip()]
            if bad:
                raise ValueError(f"bad_words must be strings with a non-space character, got {_short(bad)}")
            if sum(len(w) for w in self.bad_words) > MAX_BAD_WORDS_CHARS:
                raise ValueError(f"bad_words may have at most {MAX_BAD_WORDS_CHARS} characters in all")
            self.bad_words = list(self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    """A repr of bounded size, whatever the size of the value."""
    return reprlib.repr(value)
