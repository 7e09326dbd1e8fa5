"""POST /v1/chat/completions: the tokenizer's chat template, then one prompt with ``n`` samples.

Each choice's text is split into reasoning, content and tool calls (``chat_output.py``) when the server has a
reasoning parser or the request has tools. When streaming, the first chunk of every choice carries ``role:
assistant`` (and empty content), as OpenAI does; later chunks carry content, reasoning and tool-call deltas, and
each choice's last chunk its ``finish_reason`` (``tool_calls`` when it called tools).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nanovllm.entrypoints.openai.chat_output import ChoiceDelta, ChoiceParser, ChoiceResult, ToolMode
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
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    ToolCallFunction,
    ToolCallOut,
    UsageInfo,
)
from nanovllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS, ReasoningParser
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
from nanovllm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from nanovllm.outputs import RequestOutput

# arguments the server passes to the chat template itself
_RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "chat_template",
                                     "tools"})


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: Any, served_model_names: list[str], trust_request_chat_template: bool = False,
                 tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False,
                 reasoning_parser: str | None = None) -> None:
        super().__init__(engine, served_model_names)
        self.trust_request_chat_template = trust_request_chat_template
        self.tool_parser = TOOL_PARSERS[tool_call_parser]() if tool_call_parser else None
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.reasoning_parser = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None

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
        if req.tools:
            kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
        return kwargs

    def tool_mode(self, req: ChatCompletionRequest) -> ToolMode:
        """How the request's tool calls are found (see ``chat_output``); a 400 naming what does not fit."""
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        if choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if choice == "none":
            return ToolMode("none")
        if choice == "auto":
            if self.tool_parser is None or not self.enable_auto_tool_choice:
                raise APIError(400, 'tool_choice "auto" needs a server started with --enable-auto-tool-choice and '
                                    "--tool-call-parser", param="tool_choice")
            return ToolMode("auto", parser=self.tool_parser)
        if choice == "required":
            mode = ToolMode("required", single=req.parallel_tool_calls is False)
        else:
            names = [tool.function.name for tool in req.tools]
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                    f"{names}", param="tool_choice")
            mode = ToolMode("named", function=choice.function.name)
        if self.structured_outputs(req)[0] is not None:
            raise APIError(400, "a forced tool call is already an output constraint; leave out response_format",
                           param="tool_choice")
        return mode

    async def render_chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """Messages -> the prompt's text and token ids through the engine's one intake, off the event loop (a
        template is code and may be slow); a failure is a 400 naming ``messages``."""
        conversation = [self._template_message(message) for message in messages]
        intake = self.engine.input_processor

        def render() -> tuple[str, list[int]]:
            text = intake.render_chat_text(conversation, add_generation_prompt, template_kwargs)
            return text, intake.encode(text, add_special_tokens=False)

        try:
            return await self.engine.run_in_intake(render)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None

    @staticmethod
    def _template_message(message: ChatMessage) -> dict[str, Any]:
        """A message as chat templates read it: text parts joined; tool-call arguments as objects, not text."""
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "\n".join(part.text for part in content)  # type: ignore[misc]
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(message, key) is not None:
                entry[key] = getattr(message, key)
        if message.tool_calls:
            try:
                entry["tool_calls"] = [
                    {"id": call.id, "type": "function", "function": {
                        "name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                    for call in message.tool_calls
                ]
            except ValueError:
                raise APIError(400, "tool call arguments must be JSON objects (as text)", param="messages") from None
        return entry

    async def create_chat_completion(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        self.check_model(req.model)
        self.reject_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        mode = self.tool_mode(req)
        prompt_text, prompt_ids = await self.render_chat(req.messages, req.add_generation_prompt,
                                                         self.template_kwargs(req))
        use_completion_tokens = req.max_completion_tokens is not None
        max_tokens = req.max_completion_tokens if use_completion_tokens else req.max_tokens
        renames = {"logprobs": "top_logprobs", "prompt": "messages"}
        if use_completion_tokens:
            renames["max_tokens"] = "max_completion_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs, None, renames)
        forced = mode.constraint([tool.model_dump() for tool in req.tools or []])
        if forced is not None:
            params.structured_outputs = forced
            renames["structured_outputs"] = "tools"
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        (outputs,) = await self.add_requests(request_id, [prompt_ids], params, stream=req.stream,
                                              renames=renames, user=req.user)
        top_n = req.top_logprobs or 0
        opens_reasoning = self.reasoning_parser is not None and self.reasoning_parser.prompt_opens_reasoning(
            prompt_text)

        def choice_parser() -> ChoiceParser:
            reasoning = self.reasoning_parser(opens_reasoning) if self.reasoning_parser is not None else None
            return ChoiceParser(mode, reasoning)

        if req.stream:
            return StreamingResponse(self._stream(req, request_id, outputs, params.n, top_n, choice_parser),
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
        choices = []
        for c in final.outputs:
            result = choice_parser().result(c.text)
            choices.append(ChatCompletionChoice(
                index=c.index,
                message=_message(result),
                logprobs=self.chat_logprobs(c.token_ids, c.logprobs, top_n) if req.logprobs else None,
                finish_reason=_finish_reason(mode, bool(result.tool_calls), c.finish_reason),
                stop_reason=c.stop_reason,
            ))
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
        self, req: ChatCompletionRequest, request_id: str, outputs: AsyncIterator[RequestOutput], n: int, top_n: int,
        choice_parser: Any,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        parsers = [choice_parser() for _ in range(n)]

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
                    parser = parsers[c.index]
                    delta = parser.feed(c.text)
                    if c.finish_reason is not None:
                        rest = parser.finish()
                        delta = ChoiceDelta(_join(delta.reasoning, rest.reasoning), _join(delta.content, rest.content),
                                            delta.tool_calls + rest.tool_calls)
                    if not delta and not c.token_ids and c.finish_reason is None:
                        continue  # nothing new (a token that completes no character still gets its chunk)
                    logprobs = self.chat_logprobs(c.token_ids, c.logprobs, top_n) if req.logprobs else None
                    finish = (None if c.finish_reason is None
                              else _finish_reason(parser.mode, parser.num_calls > 0, c.finish_reason))
                    yield chunk([ChatCompletionStreamChoice(
                        index=c.index, delta=_delta(delta), logprobs=logprobs, finish_reason=finish,
                        stop_reason=c.stop_reason,
                    )])
            if req.stream_options is not None and req.stream_options.include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield chunk([], usage)
        except Exception as exc:  # noqa: BLE001 - the status line is gone; the error travels in the stream
            yield sse_error(exc)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]  # aborts the request if we stopped early
        yield SSE_DONE


def _join(first: str | None, second: str | None) -> str | None:
    return (first or "") + (second or "") or None


def _finish_reason(mode: ToolMode, called: bool, engine_reason: str) -> str:
    """OpenAI's: "tool_calls" when the model chose to call tools (auto, required); a forced named call is "stop"."""
    return "tool_calls" if called and mode.kind in ("auto", "required") and engine_reason == "stop" else engine_reason


def _message(result: ChoiceResult) -> ChatResponseMessage:
    return ChatResponseMessage(
        content=result.content, reasoning_content=result.reasoning,
        tool_calls=[ToolCallOut(id=call.id, function=ToolCallFunction(name=call.name, arguments=call.arguments))
                    for call in result.tool_calls],
    )


def _delta(delta: ChoiceDelta) -> DeltaMessage:
    calls = [DeltaToolCall(index=piece.tool_call_index, id=piece.tool_call_id,
                           type="function" if piece.tool_call_id else None,
                           function=DeltaFunction(name=piece.name, arguments=piece.arguments))
             for piece in delta.tool_calls]
    return DeltaMessage(content=delta.content, reasoning_content=delta.reasoning, tool_calls=calls or None)
