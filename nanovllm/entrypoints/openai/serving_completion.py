"""POST /v1/completions: text or token-id prompts (one or a batch), ``n`` samples each, streamed or not.

Choice ``i * n + j`` is sample ``j`` of prompt ``i``, as in OpenAI and vLLM. ``echo`` puts the prompt in front of
the completion; with ``logprobs`` it also asks the engine for prompt logprobs, whose first entry is null (no
token comes before the first), which is what lm-evaluation-harness reads for log-likelihoods.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nanovllm.engine.input_processor import Prompt
from nanovllm.entrypoints.openai.errors import APIError
from nanovllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    UsageInfo,
)
from nanovllm.entrypoints.openai.serving_base import (
    SSE_DONE,
    ClientDisconnected,
    OpenAIServing,
    as_api_error,
    merge_async_iterators,
    run_until_disconnect,
    sse,
    sse_error,
)
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

MAX_PROMPTS = 256  # prompts in one batch request
MIN_LOGPROB = -9999.0  # -inf is not JSON; clients treat this as "impossible" too (vLLM's choice)


def json_response(model: object) -> Response:
    # pydantic's own JSON encoder: NaN never appears (refused on input, clamped on output) and it is fast
    return Response(model.model_dump_json(), media_type="application/json")  # type: ignore[attr-defined]


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest, raw_request: Request) -> Response:
        self.check_model(req.model)
        self.reject_unsupported(req)
        prompts = self._prompts(req.prompt)
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        renames: dict[str, str] = {}
        params = self.sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs, renames)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = await self.add_requests(request_id, prompts, params, stream=req.stream, renames=renames,
                                          user=req.user)
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, outputs, params), media_type="text/event-stream")
        finals: list[RequestOutput | None] = [None] * len(outputs)

        async def collect() -> None:
            async for index, out in merge_async_iterators(outputs):
                finals[index] = out

        try:
            await run_until_disconnect(raw_request, collect())
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except Exception as exc:  # noqa: BLE001 - mapped to the status it deserves
            raise as_api_error(exc) from None
        return json_response(self._response(req, request_id, finals, params))

    @staticmethod
    def _prompts(prompt: str | list) -> list[Prompt]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt or isinstance(prompt[0], int):
            return [prompt]  # token ids (an empty list is refused by the engine as an empty prompt)
        if len(prompt) > MAX_PROMPTS:
            raise APIError(400, f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompt)}", param="prompt")
        return list(prompt)

    def _response(
        self, req: CompletionRequest, request_id: str, finals: list[RequestOutput | None], params: SamplingParams
    ) -> CompletionResponse:
        choices, usage = [], UsageInfo()
        for i, final in enumerate(finals):
            assert final is not None
            usage.prompt_tokens += len(final.prompt_token_ids)
            for c in final.outputs:
                usage.completion_tokens += len(c.token_ids)
                text, logprobs = self._choice_body(req, final, c.text, c.token_ids, c.logprobs, echo=req.echo, offset=0)
                choices.append(CompletionResponseChoice(index=i * params.n + c.index, text=text, logprobs=logprobs,
                                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    def _choice_body(
        self, req: CompletionRequest, out: RequestOutput, text: str, token_ids: list[int],
        logprobs: list[dict[int, float]] | None, echo: bool, offset: int,
    ) -> tuple[str, CompletionLogProbs | None]:
        """Text and logprobs of one choice (or one delta of it), with the prompt in front when ``echo``."""
        if echo:
            prompt_text = out.prompt if out.prompt is not None else self._decode(out.prompt_token_ids)
            text = prompt_text + text
        if req.logprobs is None:
            return text, None
        entries: list[dict[int, float] | None] = list(logprobs or [])
        if echo:
            prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            token_ids = out.prompt_token_ids + token_ids
            entries = list(prompt_entries) + entries
        return text, self.completion_logprobs(token_ids, entries, offset)

    def completion_logprobs(
        self, token_ids: list[int], entries: list[dict[int, float] | None], offset: int
    ) -> CompletionLogProbs:
        result = CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            token = self.token_string(token_id)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            sampled = entry.get(token_id, next(iter(entry.values()), MIN_LOGPROB))
            result.token_logprobs.append(max(sampled, MIN_LOGPROB))
            top: dict[str, float] = {}
            for top_id, value in entry.items():  # the sampled token first, then the top-N (contract of the engine)
                top.setdefault(self.token_string(top_id), max(value, MIN_LOGPROB))
            result.top_logprobs.append(top)
        return result

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    async def _stream(
        self, req: CompletionRequest, request_id: str, outputs: list[AsyncIterator[RequestOutput]],
        params: SamplingParams,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        usage = UsageInfo()
        counted_prompts: set[int] = set()
        offsets: dict[int, int] = {}  # choice index -> characters sent (for text_offset)
        try:
            async for i, out in merge_async_iterators(outputs):
                if i not in counted_prompts:
                    counted_prompts.add(i)
                    usage.prompt_tokens += len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * params.n + c.index
                    usage.completion_tokens += len(c.token_ids)
                    first = index not in offsets
                    text, logprobs = self._choice_body(req, out, c.text, c.token_ids, c.logprobs,
                                                       echo=req.echo and first, offset=offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(text)
                    if not c.token_ids and not text and c.finish_reason is None:
                        continue  # nothing new for this choice
                    choice = CompletionResponseChoice(index=index, text=text, logprobs=logprobs,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                    yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                                 choices=[choice]))
            if req.stream_options is not None and req.stream_options.include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                             usage=usage))
        except Exception as exc:  # noqa: BLE001 - the status line is gone; the error travels in the stream
            yield sse_error(exc)
        yield SSE_DONE
