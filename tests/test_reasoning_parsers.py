"""The qwen3 reasoning parser: think blocks in and out of the output, the prompt's open <think>, Qwen3's framing
newlines, and streamed deltas that reassemble to exactly the non-streamed result however the output is split."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.entrypoints.openai.reasoning_parsers import (REASONING_PARSERS, Qwen3ReasoningParser, ReasoningDelta,
                                                           ReasoningResult)

THINKING = "<think>\nThe user asks for 2 + 2.\n\nThat is 4.\n</think>\n\nThe answer is **4**.\n"
NO_THINK = "The answer is 4."
EMPTY_THINK = "<think>\n\n</think>\n\nThe answer is 4."
INSIDE = "Okay, 2 + 2.\nThat is 4.\n</think>\n\nThe answer is 4."  # the prompt ended with "<think>\n"
CUT_OFF = "<think>\nLet me count: 1, 2, 3"

OUTPUTS = [
    (False, THINKING), (False, NO_THINK), (False, EMPTY_THINK), (False, CUT_OFF), (True, INSIDE), (True, CUT_OFF),
    (False, "  \n<think>x</think>y"), (False, "Not <think>ing</think> here"), (True, "\n\n</think>\n\n"),
    (False, "<think>\n \n</think>\n \n"), (False, "<thin"), (False, "<think>a</thi"), (False, ""),
    (True, "a</think>b</think>c"), (False, "<think>\n<think>nested?\n</think>ok"),
]


def merged(deltas: list[ReasoningDelta]) -> ReasoningResult:
    reasoning = "".join(d.reasoning for d in deltas if d.reasoning is not None)
    content = "".join(d.content for d in deltas if d.content is not None)
    return ReasoningResult(reasoning or None, content or None)


def stream(parser: Qwen3ReasoningParser, pieces: list[str]) -> list[ReasoningDelta]:
    streamer = parser.streamer()
    deltas = [delta for piece in pieces for delta in streamer.feed(piece)]
    deltas += streamer.finish()
    for delta in deltas:
        assert (delta.reasoning is None) != (delta.content is None)
        assert delta.reasoning != "" and delta.content != ""
    seen_content = False  # reasoning never follows content
    for delta in deltas:
        seen_content = seen_content or delta.content is not None
        assert not (seen_content and delta.reasoning is not None)
    return deltas


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_streams_like_extract(parser: Qwen3ReasoningParser, text: str, pieces: list[str]) -> None:
    assert merged(stream(parser, pieces)) == parser.extract(text), pieces


def test_registry():
    assert REASONING_PARSERS == {"qwen3": Qwen3ReasoningParser}


def test_think_block_framing_newlines_are_dropped():
    assert Qwen3ReasoningParser().extract(THINKING) == ("The user asks for 2 + 2.\n\nThat is 4.",
                                                        "The answer is **4**.\n")


def test_no_think_block_is_all_content():
    assert Qwen3ReasoningParser().extract(NO_THINK) == (None, NO_THINK)
    later = "Not <think>ing</think> here"  # only a <think> that opens the output opens reasoning
    assert Qwen3ReasoningParser().extract(later) == (None, later)
    assert Qwen3ReasoningParser().extract("\n\nHi\n") == (None, "\n\nHi\n")  # no think block: verbatim
    assert Qwen3ReasoningParser().extract(" \n") == (None, None)


def test_empty_think_block_means_no_reasoning():
    assert Qwen3ReasoningParser().extract(EMPTY_THINK) == (None, "The answer is 4.")
    assert Qwen3ReasoningParser().extract("<think></think>") == (None, None)


def test_output_starting_inside_reasoning():
    assert Qwen3ReasoningParser(starts_in_reasoning=True).extract(INSIDE) == ("Okay, 2 + 2.\nThat is 4.",
                                                                              "The answer is 4.")
    # without the flag, an output that does not open with <think> is the answer, </think> and all
    assert Qwen3ReasoningParser().extract(INSIDE) == (None, INSIDE)
    assert Qwen3ReasoningParser(starts_in_reasoning=True).extract("a</think>b</think>c") == ("a", "b</think>c")


def test_reasoning_cut_off_is_all_reasoning():
    assert Qwen3ReasoningParser().extract(CUT_OFF) == ("Let me count: 1, 2, 3", None)
    assert Qwen3ReasoningParser(starts_in_reasoning=True).extract("Hmm\n") == ("Hmm", None)


def test_whitespace_before_think_is_dropped():
    assert Qwen3ReasoningParser().extract("  \n<think>x</think>y") == ("x", "y")


def test_only_newlines_are_framing():
    parser = Qwen3ReasoningParser()
    assert parser.extract("<think> indented\n\n</think>\n  answer\n") == (" indented", "  answer\n")


@pytest.mark.parametrize("prompt, opens", [
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),  # Qwen3-2507 thinking
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),  # Qwen3, enable_thinking on
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # thinking off
    ("<|im_start|>user\nWhat is <think>?<|im_end|>\n<|im_start|>assistant\n", False),
])
def test_prompt_opens_reasoning(prompt, opens):
    assert Qwen3ReasoningParser.prompt_opens_reasoning(prompt) is opens


# ---------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("starts_in_reasoning, text", OUTPUTS)
def test_every_split_streams_like_extract(starts_in_reasoning, text):
    parser = Qwen3ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    assert_streams_like_extract(parser, text, [text])
    assert_streams_like_extract(parser, text, list(text))
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            assert_streams_like_extract(parser, text, split_at(text, [cut, cut2]))


def test_partial_tags_are_held_back():
    streamer = Qwen3ReasoningParser().streamer()
    assert streamer.feed("<thi") == []
    assert streamer.feed("nk>\n") == []
    assert streamer.feed("Hmm, 2+2") == [ReasoningDelta("Hmm, 2+2", None)]
    assert streamer.feed(" is 4.\n</thi") == [ReasoningDelta(" is 4.", None)]  # the newline may be framing
    assert streamer.feed("nk>\n\nFour") == [ReasoningDelta(None, "Four")]
    assert streamer.feed(".\n") == [ReasoningDelta(None, ".\n")]
    assert streamer.finish() == []


def test_text_that_is_not_a_tag_flows_on():
    streamer = Qwen3ReasoningParser().streamer()
    assert streamer.feed("<th") == []
    assert streamer.feed("ere") == [ReasoningDelta(None, "<there")]
    streamer = Qwen3ReasoningParser(starts_in_reasoning=True).streamer()
    assert streamer.feed("a </") == [ReasoningDelta("a ", None)]
    assert streamer.feed("b>") == [ReasoningDelta("</b>", None)]


def test_one_feed_may_end_the_reasoning_and_start_the_content():
    streamer = Qwen3ReasoningParser(starts_in_reasoning=True).streamer()
    assert streamer.feed("why</think>\n\nbecause") == [ReasoningDelta("why", None), ReasoningDelta(None, "because")]


def test_streamer_refuses_use_after_finish():
    streamer = Qwen3ReasoningParser().streamer()
    streamer.finish()
    with pytest.raises(RuntimeError):
        streamer.feed("x")


FRAGMENTS = ["<think>", "</think>", "<thi", "</th", "<", "think>", "\n", "\n\n", " ", "\t", "text", "é🌧", ">"]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


@settings(max_examples=500, deadline=None)
@given(texts, st.lists(st.integers(0, 200), max_size=8), st.booleans())
def test_any_split_of_any_text_streams_like_extract(text, cuts, starts_in_reasoning):
    parser = Qwen3ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    assert_streams_like_extract(parser, text, split_at(text, [min(c, len(text)) for c in cuts]))


@settings(max_examples=300, deadline=None)
@given(texts, st.booleans())
def test_nothing_but_framing_is_lost(text, starts_in_reasoning):
    """Reasoning and content are pieces of the text, in order; a part that is None had nothing but whitespace."""
    parser = Qwen3ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    reasoning, content = parser.extract(text)
    rest = text
    for part in (reasoning, content):
        if part is not None:
            assert part.strip() and part in rest
            rest = rest[rest.index(part) + len(part):]
    if not starts_in_reasoning and not text.lstrip().startswith("<think>"):
        assert (reasoning, content) == (None, text if text.strip() else None)
    if reasoning is None and content is None:
        assert not text.replace("<think>", "", 1).replace("</think>", "", 1).strip()
