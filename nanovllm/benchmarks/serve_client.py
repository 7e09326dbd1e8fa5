"""One streaming request against an OpenAI-compatible server, timed chunk by chunk (aiohttp).

Two backends, as vLLM's ``bench serve`` names them: ``openai`` (the completions API; the prompt goes out as token ids,
exact lengths with no re-tokenization, or as text) and ``openai-chat`` (the chat completions API; the prompt is one
user message). ``ignore_eos`` (a vLLM extension that servers without it ignore) keeps the output length at the
maximum. Token counts come from the final usage chunk (``stream_options.include_usage``), prompt tokens included; a
server that sends none is counted one token per content chunk.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from nanovllm.benchmarks.serve_server import error_message

BACKENDS = ("openai", "openai-chat", "vllm")  # vllm: the completions API, as in vLLM's bench serve
DEFAULT_ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    max_tokens: int
    kind: str = "main"  # incast: "background" or "burst"


@dataclass
class RequestResult:
    kind: str
    prompt_len: int
    start: float = 0.0  # time.perf_counter() when sent
    success: bool = False
    error: str = ""
    output_len: int = 0
    ttft: float = 0.0  # seconds to the first content chunk
    latency: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between content chunks

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None for one-token outputs)."""
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None

    @property
    def max_gap(self) -> float:
        return max(self.itl, default=0.0)


def request_body(backend: str, model: str, req: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    if backend == "openai-chat":
        if not isinstance(req.prompt, str):
            raise TypeError("the chat API takes text prompts, not token ids")
        body.update(messages=[{"role": "user", "content": req.prompt}], max_completion_tokens=req.max_tokens)
    else:
        body.update(prompt=req.prompt, max_tokens=req.max_tokens)
    return body


def _has_tokens(choice: dict[str, Any]) -> bool:
    """Whether a streamed choice carries new tokens (their text may be empty: an incomplete character, or a server
    without a tokenizer). A bare finish chunk does not, nor does the chat API's first chunk (the role alone)."""
    if "delta" in choice:
        delta = choice["delta"] or {}
        if delta.get("role") and not delta.get("content"):
            return False
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
                    or not choice.get("finish_reason"))
    return bool(choice.get("text") or not choice.get("finish_reason"))


async def send_request(
    session: aiohttp.ClientSession, url: str, backend: str, model: str, req: BenchRequest, api_key: str | None,
    ignore_eos: bool, timeout_s: float,
) -> RequestResult:
    body = request_body(backend, model, req, ignore_eos)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = RequestResult(kind=req.kind, prompt_len=req.prompt_len)
    result.start = last = time.perf_counter()
    chunks = 0
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                text = await resp.text()
                try:
                    message = error_message(json.loads(text))
                except ValueError:
                    message = text[:300]
                result.error = f"HTTP {resp.status}: {message}"
                return result
            async for raw in resp.content:  # one SSE line at a time
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = error_message(event)
                    return result
                now = time.perf_counter()
                if any(_has_tokens(choice) for choice in event.get("choices") or []):
                    if chunks == 0:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                if event.get("usage"):
                    result.output_len = int(event["usage"].get("completion_tokens") or 0)
                    result.prompt_len = int(event["usage"].get("prompt_tokens") or result.prompt_len)
        result.latency = time.perf_counter() - result.start
        result.output_len = result.output_len or chunks
        result.success = chunks > 0 or result.output_len > 0
        if not result.success:
            result.error = "the stream held no output"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result
