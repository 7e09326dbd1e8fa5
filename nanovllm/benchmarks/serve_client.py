"""One streaming completion against an OpenAI-compatible server, timed chunk by chunk (aiohttp).

The prompt goes out as token ids (exact lengths, no re-tokenization) or as text; ``ignore_eos`` (a vLLM extension
that servers without it ignore) keeps the output length at ``max_tokens``. Token counts come from the final usage
chunk (``stream_options.include_usage``); a server that sends none is counted one token per content chunk.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


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


async def send_completion(
    session: aiohttp.ClientSession, url: str, model: str, req: BenchRequest, api_key: str | None,
    ignore_eos: bool, timeout_s: float,
) -> RequestResult:
    body: dict[str, Any] = {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = RequestResult(kind=req.kind, prompt_len=req.prompt_len)
    result.start = last = time.perf_counter()
    chunks = 0
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
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
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                now = time.perf_counter()
                # a chunk with a choice carries new tokens, though their text may be empty (an incomplete
                # character, or a server without a tokenizer); a bare finish chunk does not
                if any(choice.get("text") or not choice.get("finish_reason") for choice in event.get("choices", [])):
                    if chunks == 0:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                if event.get("usage"):
                    result.output_len = int(event["usage"].get("completion_tokens", 0))
        result.latency = time.perf_counter() - result.start
        result.output_len = result.output_len or chunks
        result.success = chunks > 0 or result.output_len > 0
        if not result.success:
            result.error = "the stream held no output"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def fetch_model_name(session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(f"{base_url}/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]
