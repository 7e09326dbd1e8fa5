"""``nanovllm chat``'s conversation fitting, against every way of keeping the newest turns, with a real tokenizer and
chat template."""
from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from nanovllm.engine.input_processor import InputProcessor
from nanovllm.entrypoints.chat_history import MessageTooLong, fit_conversation

CONTEXT = 128


def _intake(max_model_len: int = CONTEXT, num_kv_pages: int = 64, block_size: int = 16) -> InputProcessor:
    """The engine's own intake, whose length check the chat must pass (only the fields that check reads)."""
    config = SimpleNamespace(hf_config=SimpleNamespace(vocab_size=1000), max_model_len=max_model_len, seed=0,
                             block_size=block_size)
    return InputProcessor(config, None, frozenset(), num_kv_pages)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def render(qwen3_dir: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)

    def render(messages: list[dict[str, Any]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    return render


def _text(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(["fox", "dog", "quick", "brown", "lazy", "journey", "step", "miles"])
                    for _ in range(rng.randint(1, max_words)))


def _expected(system: list, turns: list[list], new: dict, render: Any, max_tokens: int) -> tuple[int, int] | None:
    """(turns dropped, max_tokens) by trying every suffix of the turns, longest first; None: nothing fits."""
    for dropped in range(len(turns) + 1):
        kept = system + [m for turn in turns[dropped:] for m in turn] + [new]
        if len(render(kept)) + max_tokens <= CONTEXT:
            return dropped, max_tokens
    room = CONTEXT - len(render(system + [new]))
    return (len(turns), room) if room >= 1 else None


@pytest.mark.parametrize("seed", range(40))
def test_fitting_keeps_the_most_turns_that_fit(seed: int, render: Any) -> None:
    rng = random.Random(seed)
    system = [{"role": "system", "content": _text(rng, 10)}] if rng.random() < 0.5 else []
    turns = [[{"role": "user", "content": _text(rng, 15)}, {"role": "assistant", "content": _text(rng, 25)}]
             for _ in range(rng.randint(0, 6))]
    new = {"role": "user", "content": _text(rng, 120 if rng.random() < 0.2 else 20)}
    max_tokens = rng.choice([1, 16, 40, 64, 100, 200])
    history = system + [m for turn in turns for m in turn] + [new]
    expected = _expected(system, turns, new, render, max_tokens)
    if expected is None:
        with pytest.raises(MessageTooLong, match="max_model_len"):
            fit_conversation(history, render, _intake(), max_tokens)
        return
    fitted = fit_conversation(history, render, _intake(), max_tokens)
    assert (fitted.dropped_turns, fitted.max_tokens) == expected
    assert fitted.messages[:len(system)] == system  # the system message stays
    assert fitted.messages[len(system):] == history[len(history) - len(fitted.messages) + len(system):]
    assert fitted.prompt_ids == render(fitted.messages)
    assert len(fitted.prompt_ids) + fitted.max_tokens <= CONTEXT


def test_a_message_too_long_to_tokenize_counts_as_not_fitting() -> None:
    def render(messages: list[dict[str, Any]]) -> list[int]:
        if any(len(m["content"]) > 50 for m in messages):
            raise ValueError("prompt is longer than max_model_len")
        return [0] * sum(len(m["content"]) for m in messages)

    old = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]
    fitted = fit_conversation(old + [{"role": "user", "content": "z" * 10}], render, _intake(100), 20)
    assert (fitted.dropped_turns, fitted.max_tokens, len(fitted.messages)) == (1, 20, 1)
    with pytest.raises(MessageTooLong, match="longer than max_model_len"):
        fit_conversation([{"role": "user", "content": "z" * 60}], render, _intake(100), 20)


def test_a_kv_pool_smaller_than_max_model_len_is_the_context() -> None:
    """4 pages of 8 tokens: a request holds 32 tokens at most, though max_model_len is 128."""
    intake = _intake(num_kv_pages=4, block_size=8)

    def render(messages: list[dict[str, Any]]) -> list[int]:
        return [0] * sum(len(m["content"]) for m in messages)

    fitted = fit_conversation([{"role": "user", "content": "z" * 20}], render, intake, 40)
    assert (fitted.max_tokens, fitted.dropped_turns) == (12, 0)
    intake.check_length(len(fitted.prompt_ids), fitted.max_tokens)  # what the chat sends, the engine takes
    with pytest.raises(MessageTooLong, match="KV pages"):
        fit_conversation([{"role": "user", "content": "z" * 32}], render, intake, 40)
