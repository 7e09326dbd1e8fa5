"""POST /v1/chat/completions: the tokenizer's chat template, then one prompt with ``n`` samples.

When streaming, the first chunk of every choice carries ``role: assistant`` (and empty content), as OpenAI does;
later chunks carry content deltas, and each choice's last chunk its ``finish_reason``.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nanovllm.entrypoints.openai.errors import APIError
from nanovllm.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from nanovllm.entrypoints.openai.serving_base import (
    SSE_DONE,
    ClientDisconnected,
    OpenAIServing,
    as_api_error,
    run_until_disconnect,
    sse,
    sse_error,
)
from nanovllm.entrypoints.openai.serving_completion import MIN_LOGPROB, json_response
from nanovllm.outputs import RequestOutput


# arguments the server passes to the chat template itself
_RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "chat_template"})


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: Any, served_model_names: list[str], trust_request_chat_template: bool = False) -> None:
        super().__init__(engine, served_model_names)
        self.trust_request_chat_template = trust_request_chat_template

    def template_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The request's template arguments; a template of its own only on a server that trusts requests with one."""
        kwargs = dict(req.chat_template_kwargs or {})
        template = kwargs.pop("chat_template", None) or req.chat_template
        param = "chat_template" if req.chat_template else "chat_template_kwargs"
        reserved = sorted(_RESERVED_TEMPLATE_ARGS & kwargs.keys())
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs")
        if template is not None:
            if not self.trust_request_chat_template:
                raise APIError(400, "a chat template in the request is code the server would run; this server does "
                                    "not accept one (start it with --trust-request-chat-template)", param=param)
            kwargs["chat_template"] = template
        return kwargs

    async def render_chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Messages -> prompt token ids through the engine's one intake, off the event loop (a template is code and
        may be slow); a failure is a 400 naming ``messages``."""
        conversation = []
        for message in messages:
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "\n".join(part.text for part in content)  # type: ignore[misc]
            entry = {"role": message.role, "content": content or ""}
            if message.name is not None:
                entry["name"] = message.name
            conversation.append(entry)
        try:
            return await self.engine.run_in_intake(self.engine.input_processor.render_chat, conversation,
                                                   add_generation_prompt, template_kwargs)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None

    async def create_chat_completion(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        self.check_model(req.model)
        self.reject_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        prompt_ids = await self.render_chat(req.messages, req.add_generation_prompt, self.template_kwargs(req))
        use_completion_tokens = req.max_completion_tokens is not None
        max_tokens = req.max_completion_tokens if use_completion_tokens else req.max_tokens
        renames = {"logprobs": "top_logprobs", "prompt": "messages"}
        if use_completion_tokens:
            renames["max_tokens"] = "max_completion_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs, None, renames)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        (outputs,) = await self.add_requests(request_id, [prompt_ids], params, stream=req.stream,
                                              renames=renames, user=req.user)
        top_n = req.top_logprobs or 0
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, outputs, params.n, top_n),
                                     media_type="text/event-stream")

        async def collect() -> RequestOutput | None:
            final = None
            async for out in outputs:
                final = out
            return final

        try:
            final = await run_until_disconnect(raw_request, collect())
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001
            raise as_api_error(exc) from None
        assert final is not None
        choices = [
            ChatCompletionChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self.chat_logprobs(c.token_ids, c.logprobs, top_n) if req.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in final.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                          total_tokens=len(prompt_ids) + completion_tokens)
        return json_response(ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage))

    def chat_logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None, top_n: int) -> ChatLogProbs:
        content = []
        for token_id, entry in zip(token_ids, entries or []):
            token = self.token_string(token_id)
            sampled = entry.get(token_id, next(iter(entry.values()), MIN_LOGPROB))
            best = sorted(entry.items(), key=lambda item: -item[1])[:top_n]
            content.append(ChatLogProbsContent(
                token=token, logprob=max(sampled, MIN_LOGPROB), bytes=list(token.encode("utf-8")),
                top_logprobs=[self._chat_logprob(t, v) for t, v in best],
            ))
        return ChatLogProbs(content=content)

    def _chat_logprob(self, token_id: int, value: float) -> ChatLogProb:
        token = self.token_string(token_id)
        return ChatLogProb(token=token, logprob=max(value, MIN_LOGPROB), bytes=list(token.encode("utf-8")))

    async def _stream(
        self, req: ChatCompletionRequest, request_id: str, outputs: AsyncIterator[RequestOutput], n: int, top_n: int
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                    choices=choices, usage=usage))

        usage = UsageInfo()
        try:
            for index in range(n):
                yield chunk([ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
            async for out in outputs:
                usage.prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    usage.completion_tokens += len(c.token_ids)
                    if not c.token_ids and not c.text and c.finish_reason is None:
                        continue  # nothing new (a token that completes no character still gets its chunk)
                    logprobs = self.chat_logprobs(c.token_ids, c.logprobs, top_n) if req.logprobs else None
                    yield chunk([ChatCompletionStreamChoice(
                        index=c.index, delta=DeltaMessage(content=c.text), logprobs=logprobs,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    )])
            if req.stream_options is not None and req.stream_options.include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield chunk([], usage)
        except Exception as exc:  # noqa: BLE001 - the status line is gone; the error travels in the stream
            yield sse_error(exc)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]  # aborts the request if we stopped early
        yield SSE_DONE
