"""Structured outputs, tool calls and reasoning through the server, with the official openai client, on a tiny random
model: only a grammar can make its output valid, so each test constrains it and checks what the client gets."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from server_helpers import ServerProcess

jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
MESSAGES = [{"role": "user", "content": "what is the weather?"}]
# a template that shows tools, tool calls and tool results, to check that they reach it intact
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{%- endfor %}"
    "{%- if m.tool_call_id %} [result of {{ m.tool_call_id }}]{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def server(qwen3_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(qwen3_dir, model)
    (Path(model) / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    srv = ServerProcess(str(model), "--served-model-name", MODEL, "--max-model-len", "1024", "--num-kv-blocks", "256",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


# ---- response_format and the other spellings of structured outputs --------------------------------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 99}}}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client: openai.OpenAI, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=fmt, max_tokens=200,
                                         temperature=1.0, seed=3, n=2, stream=stream)
    texts = ["", ""]
    if stream:
        for chunk in out:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
    else:
        texts = [choice.message.content for choice in out.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("extra", [{"response_format": {"type": "json_object"}}, {"guided_json": PERSON},
                                   {"structured_outputs": {"json": PERSON}},
                                   {"guided_choice": ["red", "green"]}, {"guided_regex": "[0-9]{3}"}])
def test_completions_take_every_spelling(client: openai.OpenAI, extra: dict) -> None:
    out = client.completions.create(model=MODEL, prompt="answer:", max_tokens=200, temperature=1.0, seed=1,
                                    extra_body=extra)
    text = out.choices[0].text
    if "guided_choice" in extra:
        assert text in ("red", "green")
    elif "guided_regex" in extra:
        assert len(text) == 3 and text.isdigit()
    elif "response_format" in extra:  # any object: a random model's strings rarely end, so it may run out
        assert text.lstrip().startswith("{")
        assert out.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
    else:
        jsonschema.validate(json.loads(text), PERSON)


def test_a_bad_schema_is_a_400_naming_the_field(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=bad)
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "(unclosed"})
    assert info.value.body["param"] == "guided_regex"


# ---- tool calls -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_calls_valid_tools(client: openai.OpenAI, stream: bool) -> None:
    # one call: a random model may keep adding calls to an open-ended list until it runs out of tokens
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME],
                                         tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=5,
                                         max_tokens=300, stream=stream)
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in out:
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": call.id})
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
                finish = choice.finish_reason or finish
        found = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    else:
        message = out.choices[0].message
        finish = out.choices[0].finish_reason
        found = [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert message.content is None and len({c.id for c in message.tool_calls}) == len(found)
    assert finish == "tool_calls" and found
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for name, arguments in found:
        jsonschema.validate(json.loads(arguments), schema_of(tools[name]))


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], temperature=1.0, seed=2, max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time" and out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), schema_of(TIME))


def test_parallel_required_calls_are_valid_or_left_as_content(client: openai.OpenAI) -> None:
    """Several calls allowed: a complete list is calls, each valid; a list cut off by max_tokens is not calls, and
    its text comes back as content rather than being lost."""
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=list(tools.values()),
                                             tool_choice="required", temperature=1.0, seed=seed, max_tokens=60)
        choice = out.choices[0]
        if choice.finish_reason == "tool_calls":
            assert choice.message.tool_calls and choice.message.content is None
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), schema_of(tools[call.function.name]))
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("[")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_the_models_own_format(client: openai.OpenAI, stream: bool) -> None:
    """tool_choice "auto" with the hermes parser: the output (forced here by a grammar, as a trained model would
    write it) becomes a tool call, and the text around it content."""
    forced = 'root ::= "Let me check.<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Oslo\\"}}\\n</tool_call>"'
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], max_tokens=300,
                                         stream=stream, extra_body={"structured_outputs": {"grammar": forced}})
    if stream:
        content, calls, finish = "", [], None
        for chunk in out:
            for choice in chunk.choices:
                content += choice.delta.content or ""
                calls += [(c.function.name, c.function.arguments) for c in choice.delta.tool_calls or []]
                finish = choice.finish_reason or finish
    else:
        message = out.choices[0].message
        content, finish = message.content, out.choices[0].finish_reason
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert content == "Let me check." and finish == "tool_calls"
    assert calls == [("get_weather", json.dumps({"city": "Oslo"}))]


def test_tool_history_reaches_the_template(server: ServerProcess) -> None:
    messages = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    status, body = server.request("POST", "/tokenize", {"messages": messages})
    assert status == 200, body
    status, text = server.request("POST", "/detokenize", {"tokens": body["tokens"]})
    rendered = text["prompt"]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in rendered
    assert "sunny [result of call_1]" in rendered


def test_tools_without_a_parser_or_with_unknown_names_are_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"


# ---- reasoning ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content_is_separated(client: openai.OpenAI, stream: bool) -> None:
    forced = "<think>[a-z]{3,8}</think>[a-z]{2,6}"
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100, temperature=1.0, seed=4,
                                         stream=stream, extra_body={"guided_regex": forced})
    if stream:
        reasoning, content = "", ""
        for chunk in out:
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
    else:
        message = out.choices[0].message
        reasoning, content = message.reasoning_content, message.content
    assert reasoning.isalpha() and 3 <= len(reasoning) <= 8
    assert content.isalpha() and 2 <= len(content) <= 6
