"""The server against hostile and careless clients: no request kills the engine or freezes the server, nothing a
request sends is silently ignored, and a dead engine ends the process so that a supervisor restarts it."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from server_helpers import ServerProcess

MAX_REQUEST_BYTES = 12_000_000
CLIENT_TIMEOUT_S = 5.0
ARGS = ("--max-model-len", "256", "--num-kv-blocks", "128", "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--client-timeout", str(CLIENT_TIMEOUT_S))
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(qwen3_dir, *ARGS)
    try:
        yield srv
    finally:
        srv.stop()


def post(srv: ServerProcess, path: str, body: object, timeout_s: float = 120.0) -> tuple[int, dict]:
    status, payload = srv.request("POST", path, body, timeout_s=timeout_s)
    return status, payload if isinstance(payload, dict) else {"raw": payload}


def raw_http(port: int, data: bytes, timeout_s: float = 120.0) -> bytes:
    """Send ``data`` as is and read until the server closes the connection (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class Background:
    """A call on a thread, with its result (or exception) and when it ended."""

    def __init__(self, fn, *args) -> None:  # noqa: ANN001
        self.result: object = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args) -> None:  # noqa: ANN001
        try:
            self.result = fn(*args)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def join(self, timeout_s: float = 180.0) -> object:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the call did not end"
        if self.error is not None:
            raise self.error
        return self.result


# ---- one request cannot kill the engine --------------------------------------------------------------------------

def test_the_largest_seed_with_n_is_served_and_others_go_on(server: ServerProcess) -> None:
    other = Background(post, server, "/v1/completions",
                       {"prompt": "the other user", "max_tokens": 64, "ignore_eos": True})
    status, body = post(server, "/v1/completions",
                        {"prompt": "hi", "max_tokens": 4, "n": 2, "seed": 9223372036854775807})
    assert status == 200 and len(body["choices"]) == 2, body
    status, body = other.join()
    assert status == 200 and body["usage"]["completion_tokens"] == 64
    assert server.request("GET", "/health")[0] == 200


# ---- one request cannot freeze the server ------------------------------------------------------------------------

@pytest.mark.parametrize("path,field", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages"),
                                        ("/tokenize", "prompt")])
def test_a_10_mb_prompt_is_refused_as_too_long(server: ServerProcess, path: str, field: str) -> None:
    text = "lorem ipsum dolor " * 600_000  # 10.8 MB
    body = {"messages": [{"role": "user", "content": text}]} if field == "messages" else {"prompt": text}
    status, error = post(server, path, {**body, "max_tokens": 4} if path != "/tokenize" else body)
    assert status == 400 and error["error"]["param"] == field and "max_model_len" in error["error"]["message"]
    assert server.request("GET", "/health")[0] == 200


def test_a_request_chat_template_is_refused_unless_trusted(server: ServerProcess) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for extra, param in (({"chat_template_kwargs": {"chat_template": template}}, "chat_template_kwargs"),
                         ({"chat_template": template}, "chat_template")):
        status, body = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, **extra})
        assert status == 400 and body["error"]["param"] == param, body
        assert "--trust-request-chat-template" in body["error"]["message"]


def test_health_answers_while_a_slow_template_renders(qwen3_dir: str) -> None:
    """A trusted, slow template (nine million loop turns) renders on an intake thread: /health keeps answering
    while it runs, instead of after it."""
    slow = ("{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    srv = ServerProcess(qwen3_dir, *ARGS, "--trust-request-chat-template")
    try:
        heavy = Background(post, srv, "/v1/chat/completions",
                           {"messages": MESSAGES, "max_tokens": 1, "chat_template": slow})
        answered_during, latencies = 0, []
        while heavy.ended_at is None:
            start = time.monotonic()
            status, _ = srv.request("GET", "/health", timeout_s=60)
            latencies.append(time.monotonic() - start)
            assert status == 200
            if heavy.ended_at is None:
                answered_during += 1
        status, body = heavy.join()
        assert status == 200, body
        assert answered_during >= 1, "the health check never answered while the template rendered"
        print(f"/health during the render: {answered_during} answers, worst {1000 * max(latencies):.0f} ms")
    finally:
        srv.stop()


def test_a_huge_stop_list_is_refused(server: ServerProcess) -> None:
    status, body = post(server, "/v1/completions",
                        {"prompt": "hi", "max_tokens": 4, "n": 8, "stop": [f"s{i}" for i in range(100_000)]})
    assert status == 400 and body["error"]["param"] == "stop" and "at most" in body["error"]["message"]


# ---- nothing accepted is ignored -----------------------------------------------------------------------------------

UNSUPPORTED = [
    # tool_choice "auto" (the default with tools) needs a server started with a tool-call parser
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),  # with no tools
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": " the end"}, "suffix"),
    ("/v1/completions", {"no_such_option": 1}, "no_such_option"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "messages"),
]


@pytest.mark.parametrize("path,extra,param", UNSUPPORTED, ids=[f"{p}-{f}" for p, _, f in UNSUPPORTED])
def test_an_unimplemented_field_is_a_400_naming_it(server: ServerProcess, path: str, extra: dict,
                                                  param: str) -> None:
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": MESSAGES}
    status, body = post(server, path, {**base, "max_tokens": 2, **extra})
    assert status == 400 and body["error"]["param"] == param, body


@pytest.mark.parametrize("extra", [{"response_format": {"type": "text"}}, {"best_of": 1}, {"suffix": ""},
                                   {"user": "someone"}])
def test_no_op_values_of_those_fields_are_accepted(server: ServerProcess, extra: dict) -> None:
    status, body = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **extra})
    assert status == 200, body


# ---- bad bodies: never a 5xx, never a hang -------------------------------------------------------------------------

def _deep(levels: int) -> bytes:
    return b'{"prompt": ' + b"[" * levels + b"]" * levels + b', "max_tokens": 2}'


BAD_BODIES: list[tuple[str, str, bytes]] = [
    ("invalid JSON", "/v1/completions", b'{"prompt": "hi", "max_tokens": '),
    ("not an object", "/v1/completions", b'["hi"]'),
    ("empty", "/v1/completions", b""),
    ("NaN", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("Infinity", "/v1/completions", b'{"prompt": "hi", "top_p": Infinity}'),
    ("huge float", "/v1/completions", b'{"prompt": "hi", "temperature": 1e400}'),
    ("huge int", "/v1/completions", b'{"prompt": "hi", "max_tokens": 100000000000000000000000000000}'),
    ("huge n", "/v1/completions", b'{"prompt": "hi", "n": 1000000000}'),
    ("negative max_tokens", "/v1/completions", b'{"prompt": "hi", "max_tokens": -5}'),
    ("wrong prompt type", "/v1/completions", b'{"prompt": 5}'),
    ("prompt of dicts", "/v1/completions", b'{"prompt": [{"a": 1}]}'),
    ("messages as a string", "/v1/chat/completions", b'{"messages": "hello"}'),
    ("a message without role", "/v1/chat/completions", b'{"messages": [{"content": "x"}]}'),
    ("an image part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}'),
    ("out-of-vocabulary ids", "/v1/completions", b'{"prompt": [1, 2, 99999999], "max_tokens": 2}'),
    ("negative ids", "/v1/completions", b'{"prompt": [-1], "max_tokens": 2}'),
    ("lone surrogate", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}'),
    ("control characters", "/v1/completions", b'{"prompt": "a\\u0000b\\u001bc\\u007f", "max_tokens": 2}'),
    ("raw control bytes", "/v1/completions", b'{"prompt": "a\x00b\x1b", "max_tokens": 2}'),
    ("not UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
    ("deep nesting", "/v1/completions", _deep(100_000)),
    ("moderate nesting", "/v1/completions", _deep(900)),
    ("a deep template argument", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": ' + b"[" * 50_000
     + b"]" * 50_000 + b"}}"),
    ("huge logprobs", "/v1/completions", b'{"prompt": "hi", "logprobs": 100000}'),
    ("huge top_k", "/v1/completions", b'{"prompt": "hi", "top_k": 10000000000000, "max_tokens": 2}'),
    ("10 MB of garbage", "/v1/completions", b"\x01" * 10_000_000),
    ("10 MB prompt of token ids", "/tokenize", b'{"prompt": "' + b"9" * 10_000_000 + b'"}'),
    ("a stop list of huge strings", "/v1/completions",
     json.dumps({"prompt": "hi", "stop": ["x" * 100_000]}).encode()),
]


@pytest.mark.parametrize("path,body", [(p, b) for _, p, b in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES])
def test_a_bad_body_is_never_a_5xx(server: ServerProcess, path: str, body: bytes) -> None:
    """A 4xx with an OpenAI error body, or (control characters in a prompt, a top_k beyond the vocabulary) a
    normal answer."""
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    response = raw_http(server.port, head + body)
    status = int(response.split(b" ", 2)[1])
    assert status < 500, response[:300]
    if status >= 400:
        error = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["message"] and error["type"]


def test_still_serving_after_the_bad_bodies(server: ServerProcess) -> None:
    status, body = post(server, "/v1/completions", {"prompt": "fine", "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


# ---- slow and oversized clients --------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_a_413(server: ServerProcess) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (MAX_REQUEST_BYTES + 1))
    assert raw_http(server.port, head).split(b" ", 2)[1] == b"413"  # refused from the head alone
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n")
    piece = b"a" * (MAX_REQUEST_BYTES // 12)
    for _ in range(12):  # the limit exactly, then one byte too many: all sent before the server refuses
        chunked += b"%x\r\n%s\r\n" % (len(piece), piece)
    assert raw_http(server.port, chunked + b"1\r\na\r\n0\r\n\r\n").split(b" ", 2)[1] == b"413"


def test_half_sent_requests_are_closed_after_the_client_timeout(server: ServerProcess) -> None:
    """Clients that never finish a request head or body do not hold connections for ever (300 of them at once),
    and the server keeps answering meanwhile."""
    heads = [b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Le",  # half a head
             b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"prompt\": \"h"]  # a head and a tenth of the body
    sockets = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
            sock.sendall(heads[i % 2])
            sockets.append(sock)
        assert server.request("GET", "/health", timeout_s=60)[0] == 200
        answers = []
        for sock in sockets:  # each is closed by the server (the body's with a 408 first)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answers.append(data)
        assert all(a == b"" for a in answers[0::2])
        assert all(a.split(b" ", 2)[1] == b"408" for a in answers[1::2])
    finally:
        for sock in sockets:
            sock.close()


# ---- the documented API is the served one ------------------------------------------------------------------------

def test_openapi_documents_400_and_the_health_body(server: ServerProcess) -> None:
    status, spec = server.request("GET", "/openapi.json")
    assert status == 200
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            assert "422" not in operation["responses"], path
    health = spec["paths"]["/health"]["get"]["responses"]
    assert "content" not in health["200"] and health["503"]["content"]["application/json"]
    assert server.request("GET", "/health") == (200, "")


# ---- a dead engine ends the server --------------------------------------------------------------------------------

def test_killing_the_engine_core_makes_the_server_exit_non_zero(qwen3_dir: str) -> None:
    srv = ServerProcess(qwen3_dir, *ARGS)
    try:
        stream = Background(post, srv, "/v1/completions",
                            {"prompt": "doomed", "max_tokens": 250, "ignore_eos": True, "stream": True})
        os.kill(srv.engine_core_pid(), signal.SIGKILL)
        assert srv.proc.wait(timeout=60) == 1
        status, body = stream.join()
        assert status in (200, 503), body  # the stream's error event, or a 503 if it arrived after the death
        assert not srv.surviving_children(timeout_s=10)
    finally:
        srv.stop()


# ---- the sampling controls OpenAI and vLLM define ----------------------------------------------------------------

def test_logit_bias_allowed_token_ids_and_bad_words_act(server: ServerProcess) -> None:
    base = {"prompt": "once upon a time", "max_tokens": 8, "ignore_eos": True, "temperature": 0}
    _, plain = post(server, "/v1/completions", {**base, "logprobs": 0})
    first = plain["choices"][0]["logprobs"]["tokens"][0]
    status, tok = server.request("POST", "/tokenize", {"prompt": first, "add_special_tokens": False})
    favourite = 7 if tok["tokens"] != [7] else 8
    status, biased = post(server, "/v1/completions", {**base, "logit_bias": {str(favourite): 100}})
    status_ids, tokens = server.request("POST", "/detokenize", {"tokens": [favourite] * 8})
    assert status == 200 and biased["choices"][0]["text"] == tokens["prompt"]
    status, allowed = post(server, "/v1/completions", {**base, "allowed_token_ids": [favourite, favourite + 1],
                                                       "temperature": 1.0, "seed": 3, "logprobs": 0})
    assert status == 200
    ids = [server.request("POST", "/tokenize", {"prompt": t, "add_special_tokens": False})[1]["tokens"]
           for t in allowed["choices"][0]["logprobs"]["tokens"]]
    assert all(i in ([favourite], [favourite + 1]) for i in ids), ids
    # bad_words: a prompt whose greedy first token is a whole word (one token, the same when tokenized again)
    for prompt in ("once upon a time", "the weather today", "hello world", "a b c", "numbers 1 2 3"):
        _, plain = post(server, "/v1/completions", {**base, "prompt": prompt, "logprobs": 0})
        word = plain["choices"][0]["logprobs"]["tokens"][0]
        ids = server.request("POST", "/tokenize", {"prompt": word, "add_special_tokens": False})[1]["tokens"]
        if word.strip() == word and word.isalnum() and len(ids) == 1:
            break
    else:
        pytest.fail("no prompt starts its answer with a one-token word")
    status, banned = post(server, "/v1/completions", {**base, "prompt": prompt, "logprobs": 0, "bad_words": [word]})
    assert status == 200 and banned["choices"][0]["logprobs"]["tokens"][0] != word
    status, error = post(server, "/v1/completions", {**base, "bad_words": ["w"] * 129})
    assert status == 400 and error["error"]["param"] == "bad_words"
    status, error = post(server, "/v1/completions", {**base, "logit_bias": {"not-a-token": 1}})
    assert status == 400 and error["error"]["param"] == "logit_bias"
    status, error = post(server, "/v1/completions", {**base, "logit_bias": {"99999999": 1}})
    assert status == 400 and error["error"]["param"] == "logit_bias"
