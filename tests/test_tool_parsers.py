"""Tool-call parsers (hermes, llama3_json): recorded-style outputs, malformed calls, and streamed deltas that
reassemble to exactly the non-streamed result however the output is split."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.entrypoints.openai.reasoning_parsers import Qwen3ReasoningParser
from nanovllm.entrypoints.openai.tool_parsers import (TOOL_PARSERS, ExtractedToolCalls, HermesToolParser,
                                                      Llama3JsonToolParser, StreamDelta, ToolCall, ToolParser,
                                                      merge_deltas, new_tool_call_id)

HERMES = HermesToolParser()
LLAMA = Llama3JsonToolParser()


def calls_of(result: ExtractedToolCalls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in result.tool_calls]


def without_ids(result: ExtractedToolCalls) -> tuple[str | None, list[tuple[str, str]]]:
    return result.content, [(call.name, call.arguments) for call in result.tool_calls]


def stream(parser: ToolParser, pieces: list[str]) -> list[StreamDelta]:
    streamer = parser.streamer()
    deltas = [delta for piece in pieces for delta in streamer.feed(piece)]
    return deltas + streamer.finish()


def check_delta_shapes(deltas: list[StreamDelta]) -> None:
    """Each delta is content or one whole call; calls come with consecutive indexes, unique ids, valid JSON."""
    ids = []
    for delta in deltas:
        if delta.content is not None:
            assert delta.content and delta.tool_call_index is None and delta.name is None
            continue
        assert delta.tool_call_index == len(ids) and delta.name and delta.arguments is not None
        assert isinstance(json.loads(delta.arguments), dict)
        ids.append(delta.tool_call_id)
    assert len(set(ids)) == len(ids)


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_streams_like_extract(parser: ToolParser, text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    deltas = stream(parser, pieces)
    check_delta_shapes(deltas)
    assert without_ids(merge_deltas(deltas)) == without_ids(parser.extract(text)), pieces


def assert_every_split(parser: ToolParser, text: str) -> None:
    """Every cut into two pieces, one character at a time, and the whole text at once."""
    assert_streams_like_extract(parser, text, [text])
    assert_streams_like_extract(parser, text, list(text))
    for cut in range(len(text) + 1):
        assert_streams_like_extract(parser, text, split_at(text, [cut]))


def call_block(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# ------------------------------------------------------------------------------------------ recorded outputs

QWEN_TWO_CALLS = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
    '"date": "2024-10-01"}}\n</tool_call>')
QWEN_TEXT_AROUND = (
    "I'll check the weather in Paris first.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
    "{\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\nThen I will summarise it.")
QWEN_NESTED = (
    '<tool_call>\n{"name": "run_code", "arguments": {"code": "def f(x):\\n    return {\'a\': [x, {}]}  # }}",'
    ' "note": "ends with </tool_call> and <tool_call>", "opts": {"deep": {"list": [1, 2.5, -3e2, true, null]}}}}'
    '\n</tool_call>')
QWEN_UNICODE = ('<tool_call>\n{"name": "translate", "arguments": {"text": "Grüße aus Zürich 🌧", '
                '"escaped": "\\u00fc\\ud83c\\udf27", "cjk": "天气"}}\n</tool_call>')
QWEN_MALFORMED_THEN_GOOD = (
    'Trying.\n<tool_call>\n{"name": "broken", "arguments": {"a": 1}\n</tool_call>\n'
    '<tool_call>\n{"name": "ok", "arguments": {}}\n</tool_call>')
HERMES2_PYTHON_REPR = "<tool_call>\n{'arguments': {'symbol': 'TSLA'}, 'name': 'get_stock_fundamentals'}\n</tool_call>"
QWEN_CUT_OFF = 'Let me search.\n<tool_call>\n{"name": "search", "arguments": {"query": "nano vl'

LLAMA_SINGLE = ('{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
                '"unit": "Fahrenheit"}}')
LLAMA_TAGGED = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_SEVERAL = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                 '{"type": "function", "name": "get_time", "arguments": {"tz": "Europe/Paris"}};'
                 '{"name": "noop", "parameters": {}}')
LLAMA_CODE = "<|python_tag|>import math\nprint(math.sqrt(2))"
LLAMA_PLAIN = "The capital of France is Paris."

RECORDED = [
    (HERMES, QWEN_TWO_CALLS), (HERMES, QWEN_TEXT_AROUND), (HERMES, QWEN_NESTED), (HERMES, QWEN_UNICODE),
    (HERMES, QWEN_MALFORMED_THEN_GOOD), (HERMES, HERMES2_PYTHON_REPR), (HERMES, QWEN_CUT_OFF),
    (HERMES, "Use <tool_call> tags, as in <tool_call>{\"x\": 1}</tool_call>."), (HERMES, "\n\n" + call_block("f", {})),
    (LLAMA, LLAMA_SINGLE), (LLAMA, LLAMA_TAGGED), (LLAMA, LLAMA_SEVERAL), (LLAMA, LLAMA_CODE), (LLAMA, LLAMA_PLAIN),
    (LLAMA, LLAMA_SINGLE + "\n\nI asked for the conditions."), (LLAMA, '{"city": "Paris", "country": "France"}'),
    (LLAMA, LLAMA_SINGLE + '; {"name": "f", "parameters": {"a": NaN}}'),
]


def test_registry_names_and_markers():
    assert TOOL_PARSERS == {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}
    assert HermesToolParser.tool_call_start == "<tool_call>" and HermesToolParser.tool_call_end == "</tool_call>"
    assert Llama3JsonToolParser.tool_call_start == "<|python_tag|>"


def test_hermes_several_calls():
    result = HERMES.extract(QWEN_TWO_CALLS)
    assert result.content is None  # the newline between the blocks is whitespace only
    assert calls_of(result) == [
        ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
        ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})]
    assert result.tool_calls[1].arguments == '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}'


def test_hermes_text_before_and_after_stays_verbatim():
    result = HERMES.extract(QWEN_TEXT_AROUND)
    assert result.content == "I'll check the weather in Paris first.\n\nThen I will summarise it."
    assert calls_of(result) == [("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_hermes_json_strings_may_hold_braces_and_markers():
    result = HERMES.extract(QWEN_NESTED)
    assert result.content is None
    [(name, arguments)] = calls_of(result)
    assert name == "run_code"
    assert arguments["code"] == "def f(x):\n    return {'a': [x, {}]}  # }}"
    assert arguments["note"] == "ends with </tool_call> and <tool_call>"
    assert arguments["opts"] == {"deep": {"list": [1, 2.5, -300.0, True, None]}}


def test_arguments_are_normalised_like_vllm():
    """json.dumps(arguments, ensure_ascii=False): canonical spacing, unicode as itself, escapes decoded."""
    result = HERMES.extract(QWEN_UNICODE)
    arguments = result.tool_calls[0].arguments
    assert arguments == '{"text": "Grüße aus Zürich 🌧", "escaped": "ü🌧", "cjk": "天气"}'
    assert arguments == json.dumps(json.loads(arguments), ensure_ascii=False)
    compact = HERMES.extract('<tool_call>{"name":"f","arguments":{"a":[1,2],"b":{"c":"x\ty"}}}</tool_call>')
    assert compact.tool_calls[0].arguments == '{"a": [1, 2], "b": {"c": "x\\ty"}}'  # a raw tab, re-escaped


@pytest.mark.parametrize("body, arguments", [
    ('{"name": "f"}', "{}"),
    ('{"name": "f", "arguments": null}', "{}"),
    ('{"name": "f", "parameters": {"a": 1}}', '{"a": 1}'),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', '{"a": 1}'),  # arguments as a JSON string
    ('{"arguments": {"a": "\\ud800"}, "name": "f"}', '{"a": "\\ud800"}'),  # a lone surrogate stays escaped
])
def test_argument_spellings(body, arguments):
    [call] = HERMES.extract(f"<tool_call>{body}</tool_call>").tool_calls
    assert (call.name, call.arguments) == ("f", arguments)


@pytest.mark.parametrize("text", [
    HERMES2_PYTHON_REPR,  # Python's repr, not JSON
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>',  # name not a string
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',  # json.dumps would not give JSON
    '<tool_call>\n{"name": "f", "arguments": {"x": 1e999}}\n</tool_call>',
    '<tool_call>\n["f", {}]\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}\nand more</tool_call>',  # text inside the block
    '<tool_call>\n{"name": "f", "arguments": {}}',  # never closed
    QWEN_CUT_OFF,
    "<tool_call>",
    "Wrap each call in <tool_call></tool_call> tags.",
    "<tool_call>\n" + "[" * 5000 + "]" * 5000 + "\n</tool_call>",
    '<tool_call>{"name": "f", "arguments": ' + '{"a": ' * 5000 + "1" + "}" * 5001 + "</tool_call>",  # too deep
])
def test_hermes_malformed_calls_stay_content(text):
    result = HERMES.extract(text)
    assert result == ExtractedToolCalls(content=text, tool_calls=[])
    assert_streams_like_extract(HERMES, text, list(text))


def test_hermes_malformed_block_does_not_hide_the_next_one():
    result = HERMES.extract(QWEN_MALFORMED_THEN_GOOD)
    assert calls_of(result) == [("ok", {})]
    assert result.content == 'Trying.\n<tool_call>\n{"name": "broken", "arguments": {"a": 1}\n</tool_call>\n'


def test_llama3_with_and_without_python_tag():
    assert calls_of(LLAMA.extract(LLAMA_SINGLE)) == [
        ("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]
    tagged = LLAMA.extract(LLAMA_TAGGED)
    assert tagged.content is None and calls_of(tagged) == [("get_weather", {"city": "Paris"})]
    assert calls_of(LLAMA.extract("\n " + LLAMA_TAGGED)) == [("get_weather", {"city": "Paris"})]


def test_llama3_semicolon_separated_calls():
    result = LLAMA.extract(LLAMA_SEVERAL)
    assert result.content is None
    assert calls_of(result) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"}),
                                ("noop", {})]


def test_llama3_text_is_content():
    assert LLAMA.extract(LLAMA_PLAIN) == ExtractedToolCalls(LLAMA_PLAIN, [])
    assert LLAMA.extract(LLAMA_CODE) == ExtractedToolCalls(LLAMA_CODE, [])  # built-in python tool: code, not JSON
    answer = '{"city": "Paris", "country": "France"}'  # a JSON answer is not a call
    assert LLAMA.extract(answer) == ExtractedToolCalls(answer, [])
    later = "Sure: " + LLAMA_SINGLE  # calls are only recognised at the start
    assert LLAMA.extract(later) == ExtractedToolCalls(later, [])


def test_llama3_text_after_the_calls():
    result = LLAMA.extract(LLAMA_SINGLE + " ;\n\nI asked for the conditions.")
    assert result.content == "I asked for the conditions." and len(result.tool_calls) == 1
    bad_second = LLAMA_SINGLE + '; {"name": "f", "parameters": {"a": NaN}}'
    result = LLAMA.extract(bad_second)
    assert result.content == '{"name": "f", "parameters": {"a": NaN}}' and len(result.tool_calls) == 1
    cut_off = LLAMA_TAGGED + '; {"name": "get_time", "param'
    result = LLAMA.extract(cut_off)
    assert result.content == '{"name": "get_time", "param' and len(result.tool_calls) == 1


def test_ids_are_unique_and_spelled_like_vllm():
    result = HERMES.extract(QWEN_TWO_CALLS + QWEN_TWO_CALLS)
    ids = [call.id for call in result.tool_calls] + [call.id for call in HERMES.extract(QWEN_TWO_CALLS).tool_calls]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert all(re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", i) for i in ids)
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", new_tool_call_id())


def test_injected_ids():
    counter = iter(range(100))
    parser = HermesToolParser(new_id=lambda: f"call_{next(counter)}")
    assert [call.id for call in parser.extract(QWEN_TWO_CALLS).tool_calls] == ["call_0", "call_1"]


# ---------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("parser, text", RECORDED)
def test_every_split_streams_like_extract(parser, text):
    assert_every_split(parser, text)


def test_qwen3_full_output_through_both_parsers():
    """A Qwen3 answer: reasoning, then content that holds calls; the tool parser reads the content alone."""
    text = "<think>\nThe user wants the weather.\n</think>\n\n" + QWEN_TEXT_AROUND
    reasoning, content = Qwen3ReasoningParser().extract(text)
    assert reasoning == "The user wants the weather."
    result = HERMES.extract(content)
    assert result.content == "I'll check the weather in Paris first.\n\nThen I will summarise it."
    assert calls_of(result) == [("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_partial_marker_is_held_until_known():
    streamer = HERMES.streamer()
    assert streamer.feed("Hello <tool_c") == [StreamDelta(content="Hello ")]
    assert streamer.feed("alling") == [StreamDelta(content="<tool_calling")]
    assert streamer.feed(" done <") == [StreamDelta(content=" done ")]
    assert streamer.finish() == [StreamDelta(content="<")]


def test_call_is_announced_when_its_block_closes():
    streamer = HermesToolParser(new_id=lambda: "call_x").streamer()
    opening = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": "}"}}'
    assert streamer.feed(opening) == [StreamDelta(content="Sure.\n")]
    assert streamer.feed("\n</tool_") == []
    assert streamer.feed("call>\n") == [StreamDelta(tool_call_index=0, tool_call_id="call_x", name="f",
                                                    arguments='{"a": "}"}'), StreamDelta(content="\n")]
    assert streamer.finish() == []


def test_malformed_block_is_released_as_soon_as_it_cannot_be_a_call():
    streamer = HERMES.streamer()
    assert streamer.feed("Use <tool_call>") == [StreamDelta(content="Use ")]
    assert streamer.feed(" tags") == [StreamDelta(content="<tool_call> tags")]
    streamer = HERMES.streamer()
    assert streamer.feed('<tool_call>{"name": "f", "arguments": {}') == []
    released = '<tool_call>{"name": "f", "arguments": {}</tool_call>'  # a brace short: "<" cannot follow
    assert streamer.feed("</tool_call>") == [StreamDelta(content=released)]


def test_open_block_is_released_at_finish():
    streamer = HERMES.streamer()
    assert streamer.feed(QWEN_CUT_OFF) == [StreamDelta(content="Let me search.\n")]
    assert streamer.finish() == [StreamDelta(content=QWEN_CUT_OFF[len("Let me search.\n"):])]


def test_whitespace_only_content_is_never_sent():
    deltas = stream(HERMES, ["\n\n", call_block("f", {}), "\n", call_block("g", {"x": 1}), "\n"])
    assert [d.name for d in deltas] == ["f", "g"]
    streamer = HERMES.streamer()
    assert streamer.feed("  ") == [] and streamer.feed("\nHi") == [StreamDelta(content="  \nHi")]


def test_llama3_stream_holds_the_object_until_it_closes():
    streamer = Llama3JsonToolParser(new_id=lambda: "call_y").streamer()
    assert streamer.feed("<|python") == []
    assert streamer.feed('_tag|>{"name": "f", "parameters": {"q": "a}b"') == []
    assert streamer.feed("}}") == [StreamDelta(tool_call_index=0, tool_call_id="call_y", name="f",
                                               arguments='{"q": "a}b"}')]
    assert streamer.feed("; ") == []
    assert streamer.feed("That") == [StreamDelta(content="That")]
    assert streamer.finish() == []
    plain = LLAMA.streamer()
    assert plain.feed("The") == [StreamDelta(content="The")]  # not a call: text flows at once


def test_streamer_refuses_use_after_finish():
    streamer = HERMES.streamer()
    streamer.finish()
    with pytest.raises(RuntimeError):
        streamer.feed("x")
    with pytest.raises(RuntimeError):
        streamer.finish()


def test_merge_deltas_accepts_argument_fragments():
    deltas = [StreamDelta(content="Hi"), StreamDelta(tool_call_index=0, tool_call_id="a", name="f", arguments='{"x'),
              StreamDelta(tool_call_index=0, arguments='": 1}')]
    assert merge_deltas(deltas) == ExtractedToolCalls("Hi", [ToolCall("a", "f", '{"x": 1}')])


# ----------------------------------------------------------------------------------------------- properties

FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "</tool", "<|python_tag|>", "<|python", "\n", " ", ";", "{", "}", "[",
    "]", '"', "\\", ":", ",", '"name"', '"arguments"', '"parameters"', '"f"', "{}", "1", "NaN", "text", "é🌧",
    call_block("f", {"a": "}</tool_call>"}), call_block("g", {}), '{"name": "h", "parameters": {"k": [1, {}]}}',
    '{"name": "f", "arguments": ', "}}", '"x"',
]
LLAMA_CALLS = ['{"name": "f", "parameters": {"a": ";"}}', '{"name": "g", "arguments": {}}', "; ", ";", " \n"]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)
# llama3_json only sees calls at the start of the output: begin most of its texts with some
llama_texts = st.tuples(st.sampled_from(["", "<|python_tag|>", " <|python_tag|>\n", "<|python_tag|>x"]),
                        st.lists(st.sampled_from(LLAMA_CALLS), max_size=5).map("".join), texts).map("".join)
parsers_and_texts = st.one_of(st.tuples(st.just(HERMES), texts), st.tuples(st.just(LLAMA), texts),
                              st.tuples(st.just(LLAMA), llama_texts))


@st.composite
def split_texts(draw: st.DrawFn) -> tuple[ToolParser, str, list[str]]:
    parser, text = draw(parsers_and_texts)
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=8))
    return parser, text, split_at(text, cuts)


@settings(max_examples=600, deadline=None)
@given(split_texts())
def test_any_split_of_any_text_streams_like_extract(split):
    parser, text, pieces = split
    assert_streams_like_extract(parser, text, pieces)


@settings(max_examples=400, deadline=None)
@given(parsers_and_texts)
def test_no_text_is_lost(parser_and_text):
    """Without calls, content is the text itself; with some, it is what is left of the text once they are cut out,
    and each call's arguments are canonical JSON."""
    parser, text = parser_and_text
    result = parser.extract(text)
    if not result.tool_calls:
        assert result.content == (text if text.strip() else None)
    for call in result.tool_calls:
        assert json.dumps(json.loads(call.arguments), ensure_ascii=False) == call.arguments
    assert _is_subsequence(result.content or "", text)
    if parser is HERMES:
        assert len(result.tool_calls) <= text.count("<tool_call>")


def _is_subsequence(small: str, big: str) -> bool:
    chars = iter(big)
    return all(char in chars for char in small)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.lists(st.integers(0, 60), max_size=6), st.sampled_from([HERMES, LLAMA]))
def test_arbitrary_unicode_never_raises(text, cuts, parser):
    assert_streams_like_extract(parser, text, split_at(text, [min(c, len(text)) for c in cuts]))
