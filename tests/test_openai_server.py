"""The OpenAI-compatible server over loopback, driven by the official ``openai`` client (tiny model, CPU)."""
from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from server_helpers import API_KEY, ServerProcess

MODEL = "tiny"
MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Where are you going?"}]


@pytest.fixture(scope="module")
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(qwen3_dir, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                        "--num-kv-blocks", "128", "--shutdown-timeout", "5", api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.v1, api_key=API_KEY, timeout=60, max_retries=0) as c:
        yield c


# ---- models, version, tokenizer, metrics --------------------------------------------------------------------------

def test_models(client: openai.OpenAI, qwen3_dir: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_dump()
    assert card["root"] == qwen3_dir
    assert card["max_model_len"] == MAX_MODEL_LEN


def test_version_and_health(server: ServerProcess) -> None:
    import nanovllm

    assert server.request("GET", "/version") == (200, {"version": nanovllm.__version__})
    assert server.request("GET", "/health")[0] == 200  # no API key needed outside /v1


def test_tokenize_detokenize_round_trip(server: ServerProcess) -> None:
    key = {"Authorization": f"Bearer {API_KEY}"}
    status, body = server.request("POST", "/tokenize", {"prompt": PROMPT, "model": MODEL}, headers=key)
    assert status == 200, body
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == MAX_MODEL_LEN
    status, back = server.request("POST", "/detokenize", {"tokens": body["tokens"]}, headers=key)
    assert (status, back) == (200, {"prompt": PROMPT})
    status, chat = server.request("POST", "/tokenize", {"messages": MESSAGES}, headers=key)
    assert status == 200 and chat["count"] > body["count"]
    status, err = server.request("POST", "/detokenize", {"tokens": [10**6]}, headers=key)
    assert status == 400 and err["error"]["param"] == "tokens"
    for path, request in (("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": body["tokens"]})):
        status, err = server.request("POST", path, request)  # the tokenizer routes are guarded like /v1
        assert status == 401 and err["error"]["code"] == "invalid_api_key"


def test_metrics_names(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    metrics = server.metrics()
    for name in ("nanovllm:num_requests_running", "nanovllm:num_requests_waiting", "nanovllm:kv_cache_usage_perc",
                 "nanovllm:kv_cache_used_pages", "nanovllm:prefix_cache_queries_total",
                 "nanovllm:prefix_cache_hits_total", "nanovllm:prompt_tokens_total",
                 "nanovllm:generation_tokens_total", "nanovllm:time_to_first_token_seconds_count",
                 "nanovllm:inter_token_latency_seconds_count", "nanovllm:e2e_request_latency_seconds_count"):
        assert name in metrics, name
    assert metrics["nanovllm:generation_tokens_total"] >= 3
    assert metrics["nanovllm:e2e_request_latency_seconds_count"] >= 1
    assert metrics['nanovllm:time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1


# ---- completions ----------------------------------------------------------------------------------------------------

def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert isinstance(out.choices[0].text, str)


def test_completion_token_id_prompts_and_batches(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=2, n=2, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 5
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy samples of one prompt agree


def test_completion_n_sampled(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=1,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 24
    assert len({c.text for c in out.choices}) > 1  # distinct samples from one seed


def _stream_completion(client: openai.OpenAI, **kwargs: object) -> tuple[dict[int, str], dict[int, list], list]:
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    chunks = list(client.completions.create(model=MODEL, stream=True, **kwargs))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, finishes, chunks


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI) -> None:
    kwargs = dict(prompt=[PROMPT, "Once upon a time"], max_tokens=12, temperature=0, n=2)
    full = client.completions.create(model=MODEL, **kwargs)
    texts, finishes, _ = _stream_completion(client, **kwargs)
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: [c.finish_reason] for c in full.choices}  # once per choice


def test_stream_usage_chunk(client: openai.OpenAI) -> None:
    _, finishes, chunks = _stream_completion(client, prompt=PROMPT, max_tokens=4, temperature=0,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    assert finishes == {0: ["length"]}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_ends_with_done(server: ServerProcess) -> None:
    status, text = server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True},
                                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200
    events = [line for line in text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_echo_with_logprobs(client: openai.OpenAI) -> None:
    """lm-evaluation-harness's log-likelihood request: echo the prompt with its logprobs, first one null."""
    prompt_ids = [5, 17, 42, 99, 7]
    out = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=1, temperature=0, echo=True,
                                    logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt_ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])  # the token itself plus the top 2
    assert lp.text_offset == sorted(lp.text_offset)


def test_completion_logprobs_stream(client: openai.OpenAI) -> None:
    _, _, chunks = _stream_completion(client, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
    assert len(tokens) == 4 and all(t <= 0 for t in tokens)


def test_stop_strings_and_penalties_accepted(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[4:6] if len(text) >= 6 and text[4:6].strip() else None
    if stop:
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
        assert out.choices[0].finish_reason == "stop" and stop not in out.choices[0].text
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.5, presence_penalty=1.0,
                                    frequency_penalty=0.5, user="someone",
                                    extra_body={"repetition_penalty": 1.2, "min_tokens": 2, "top_k": 10,
                                                "min_p": 0.05, "stop_token_ids": [0]})
    assert out.usage.completion_tokens >= 2


def test_unknown_field_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"unknown_field": 1})
    assert info.value.body["param"] == "unknown_field" and "unknown field" in info.value.body["message"]


# ---- chat -----------------------------------------------------------------------------------------------------------

def test_chat(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert out.usage.completion_tokens <= 6 and choice.finish_reason in ("stop", "length")


def test_chat_stream_role_first_and_equal_text(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0, n=2)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    seen: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        if choice.index not in seen:
            assert choice.delta.role == "assistant"  # the first chunk of each choice names the role
            seen[choice.index] = ""
        seen[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert seen == {c.index: c.message.content for c in full.choices}
    assert finishes == {c.index: [c.finish_reason] for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob  # the best token is at least as likely (greedy)


# ---- errors ---------------------------------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens", "max_model_len"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": ["a", ""]}, "prompt", "empty"),
    ({"prompt": [1, 2, 10**6]}, "prompt", "[0, "),
    ({"logprobs": 21}, "logprobs", "[0, 20]"),
    ({"n": 0}, "n", "[1, "),
    ({"max_tokens": "many"}, "max_tokens", "integer"),
    ({"presence_penalty": 3.0}, "presence_penalty", "[-2, 2]"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids", "[0, "),
]


@pytest.mark.parametrize("override,param,fragment", BAD_COMPLETIONS, ids=[p for _, p, _ in BAD_COMPLETIONS])
def test_completion_400(client: openai.OpenAI, override: dict, param: str, fragment: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, **override}
    prompt = body.pop("prompt")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, extra_body=body)
    error = info.value.body
    assert info.value.status_code == 400
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param and fragment in error["message"], error


BAD_CHATS = [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "[0, 20]"),
    ({"max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens", "max_model_len"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"messages": []}, "messages", "at least 1"),
]


@pytest.mark.parametrize("override,param,fragment", BAD_CHATS, ids=[p for _, p, _ in BAD_CHATS])
def test_chat_400(client: openai.OpenAI, override: dict, param: str, fragment: str) -> None:
    body = {"messages": MESSAGES, **override}
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, extra_body=body)
    assert info.value.body["param"] == param and fragment in info.value.body["message"], info.value.body


def test_stream_400_before_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1, stream=True)


def test_invalid_json_is_400_not_422(server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, body = server.request("POST", "/v1/completions", {"max_tokens": 3}, headers=auth)  # no prompt
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = server.request("POST", "/v1/chat/completions", {"messages": "hi"}, headers=auth)
    assert status == 400 and body["error"]["param"] == "messages"


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-5", prompt=PROMPT, max_tokens=2)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_401(server: ServerProcess, key: str | None) -> None:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    status, body = server.request("POST", "/v1/completions", {"prompt": PROMPT}, headers=headers)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    if key is not None:  # the client itself refuses to send no key at all
        with openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=30) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
