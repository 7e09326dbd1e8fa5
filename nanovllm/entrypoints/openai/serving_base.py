"""What the completion and chat handlers share: model checks, sampling params, queueing, SSE and disconnects."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from nanovllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from nanovllm.engine.input_processor import Prompt
from nanovllm.entrypoints.openai.errors import APIError, bad_request, error_body
from nanovllm.entrypoints.openai.protocol import UNSUPPORTED, RequestModel, SamplingFields
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_N = 128  # samples per prompt; a bound so that one request cannot queue an unbounded number of sequences
_DONE = object()


class ClientDisconnected(Exception):
    pass


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.tokenizer = engine.tokenizer
        self._token_strings: dict[int, str] = {}
        # what a request leaves out, as SamplingParams arguments (the model's generation config, set by the server)
        self.default_sampling: dict[str, Any] = {}

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves {self.served_model_names}",
                           param="model", code="model_not_found")

    @staticmethod
    def structured_outputs(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
        """The one constraint a request sets, and the field that set it (more than one is a 400 naming them)."""
        given: dict[str, dict[str, Any]] = {}
        if req.response_format is not None and req.response_format.type != "text":
            if req.response_format.type == "json_object":
                given["response_format"] = {"json_object": True}
            elif req.response_format.json_schema is None or req.response_format.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            else:
                given["response_format"] = {"json": req.response_format.json_schema.schema_}
        if req.structured_outputs is not None:
            given["structured_outputs"] = req.structured_outputs
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(req, name) is not None:
                given[name] = {key: getattr(req, name)}
        if len(given) > 1:
            raise APIError(400, f"give one output constraint, not {sorted(given)}", param=sorted(given)[1])
        if not given:
            return None, None
        (field, spec), = given.items()
        try:
            return StructuredOutputsParams(**spec), field
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"{field}: {exc}", param=field) from None

    @staticmethod
    def reject_unsupported(req: RequestModel) -> None:
        """A field this server does not implement, set to anything but its no-op value, is a 400 naming it."""
        for name, message in UNSUPPORTED.items():
            value = getattr(req, name, None)
            harmless = (value is None or (name == "best_of" and value == getattr(req, "n", 1))
                        or (name == "suffix" and value == "") or (name == "response_format" and value == {"type": "text"}))
            if not harmless:
                raise APIError(400, message, param=name)

    def check_healthy(self) -> None:
        if not self.engine.is_healthy:
            raise APIError(503, "the engine is not running")

    def sampling_params(
        self, req: SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
        renames: dict[str, str] | None = None,
    ) -> SamplingParams:
        """Build and validate ``SamplingParams``; a bad value is a 400 naming the request's field. ``renames``
        (request field of each engine field, where they differ) gains the spelling of the output constraint."""
        if not 1 <= req.n <= MAX_N:
            raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {req.n}", param="n")
        structured, spelling = self.structured_outputs(req)
        if spelling is not None and renames is not None:
            renames["structured_outputs"] = spelling
        logit_bias = None
        if req.logit_bias is not None:
            try:
                logit_bias = {int(token): bias for token, bias in req.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        if not {"max_tokens", "max_completion_tokens"} & req.model_fields_set:
            max_tokens = self.default_sampling.get("max_tokens", max_tokens)
        top_k = self._value(req, "top_k", -1)
        if top_k >= self.engine.vocab_size:
            top_k = -1  # keeping the whole vocabulary is no filter (and keeps huge values off the device)
        try:
            return SamplingParams(
                n=req.n,
                temperature=self._value(req, "temperature", 1.0),
                top_p=self._value(req, "top_p", 1.0),
                top_k=top_k,
                min_p=self._value(req, "min_p", 0.0),
                seed=req.seed,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                logit_bias=logit_bias,
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words,
                structured_outputs=structured,
                ignore_eos=req.ignore_eos,
                skip_special_tokens=req.skip_special_tokens,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=self._value(req, "repetition_penalty", 1.0),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except ValueError as exc:
            raise bad_request(exc, renames) from None

    def _value(self, req: SamplingFields, name: str, neutral: Any) -> Any:
        """The request's value; where it leaves the field out (or null), the server's default, else ``neutral``."""
        value = getattr(req, name)
        if name in req.model_fields_set and value is not None:
            return value
        return self.default_sampling.get(name, neutral if value is None else value)

    async def add_requests(
        self, request_id: str, prompts: list[Prompt], params: SamplingParams, stream: bool,
        renames: dict[str, str] | None = None, user: str | None = None,
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue every prompt, or none: a bad prompt aborts those already queued and answers 400."""
        self.check_healthy()
        if user:
            logger.info("request %s is from user %r", request_id, user)
        outputs: list[AsyncIterator[RequestOutput]] = []
        ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        try:
            for engine_id, prompt in zip(ids, prompts):
                outputs.append(await self.engine.add_request(engine_id, prompt, params, stream=stream))
        except BaseException as exc:
            for engine_id in ids[: len(outputs)]:
                self.engine.abort_request(engine_id)  # never iterated: their streams cannot abort themselves
            if isinstance(exc, ValueError):
                raise bad_request(exc, renames) from None
            if isinstance(exc, EngineDeadError):
                raise APIError(503, str(exc)) from None
            raise
        return outputs

    def token_string(self, token_id: int) -> str:
        text = self._token_strings.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            self._token_strings[token_id] = text
        return text


def sse(payload: Any) -> str:
    """One server-sent event holding a JSON document (a pydantic model or a plain dict)."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: one error event (the caller then sends [DONE])."""
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    if isinstance(exc, ValueError):
        return sse(error_body(400, str(exc)))
    if isinstance(exc, EngineDeadError):
        return sse(error_body(503, str(exc)))
    if isinstance(exc, RequestFailedError):
        return sse(error_body(500, str(exc)))
    logger.exception("error while streaming a response", exc_info=exc)
    return sse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"))


def as_api_error(exc: BaseException) -> APIError:
    """An error before any byte was sent, as the status a non-streaming response answers."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(exc)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc))
    raise exc


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    Closing (or cancelling) the merged iterator cancels every source, which aborts their requests."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await _close(iterators[0])  # `async for` leaves a source open when we are closed early
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item))
            await queue.put((index, _DONE))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def run_until_disconnect(raw_request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (which aborts its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return task.result()
