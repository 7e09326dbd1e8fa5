"""Request and response bodies of the OpenAI-compatible API (pydantic).

Nothing a request sends is ignored: an unknown field is a 400 naming it, and fields OpenAI or vLLM define that this
server does not implement (``UNSUPPORTED``) are a 400 with a message saying so. Requests refuse NaN and
infinities, and strings that are not valid Unicode text (lone surrogates, which JSON can spell but no tokenizer or
UTF-8 encoder accepts). Value ranges are checked by ``SamplingParams`` and the input processor, so that the HTTP
API and the Python API give the same messages.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from typing_extensions import Annotated

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


# Fields OpenAI or vLLM define that this server does not implement: set to anything but their no-op value, a 400.
UNSUPPORTED = {
    "best_of": "best_of is not supported (samples are not ranked); leave it out or equal to n",
    "suffix": "suffix is not supported (no fill-in-the-middle)",
    "response_format": "response_format other than {\"type\": \"text\"} is not supported yet",
    "tools": "tools are not supported yet",
    "tool_choice": "tool_choice is not supported yet",
    "parallel_tool_calls": "parallel_tool_calls is not supported yet (no tools)",
    "functions": "functions (the older form of tools) are not supported",
    "function_call": "function_call (the older form of tool_choice) is not supported",
    "structured_outputs": "structured_outputs are not supported yet",
    "guided_json": "guided_json is not supported yet", "guided_regex": "guided_regex is not supported yet",
    "guided_choice": "guided_choice is not supported yet", "guided_grammar": "guided_grammar is not supported yet",
}


def _check_text(value: Any) -> None:
    """Every string (and key) of a JSON document encodes as UTF-8; iterative, so that deep nesting costs no stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("strings must be valid Unicode text (no lone surrogates)") from None
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        _check_text(data)
        return data


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- errors -----------------------------------------------------------------------------------------------------

class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ---- shared pieces ----------------------------------------------------------------------------------------------

class StreamOptions(RequestModel):
    include_usage: bool | None = False


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SamplingFields(RequestModel):
    """The sampling settings both endpoints take (OpenAI's names plus vLLM's extensions)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    user: str | None = None  # OpenAI's end-user id, for abuse monitoring: logged with the request's id
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    # in UNSUPPORTED (a 400 naming them when set)
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None


# ---- /v1/completions ----------------------------------------------------------------------------------------------

class CompletionRequest(SamplingFields):
    # one prompt as text or token ids, or a batch of either
    prompt: NonEmptyText | TokenIds | Annotated[list[NonEmptyText], Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None  # in UNSUPPORTED
    suffix: str | None = None  # in UNSUPPORTED

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:  # before the union's own errors, which are hard to read
        if isinstance(prompt, (str, list)) and (not prompt or any(isinstance(p, (str, list)) and not p
                                                                  for p in prompt)):
            raise ValueError("prompt must not be empty (nor hold an empty prompt)")
        return prompt


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions -----------------------------------------------------------------------------------------

class ContentPart(RequestModel):
    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # extra arguments of the chat template (e.g. enable_thinking); a template itself only with
    # --trust-request-chat-template, as it is code the server runs
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    # in UNSUPPORTED
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None


class ChatLogProb(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(ResponseModel):
    content: list[ChatLogProbsContent] | None = None


class ChatResponseMessage(ResponseModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer, version -----------------------------------------------------------------------------------

class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanovllm"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestModel):
    """Either ``prompt`` (text) or ``messages`` (a chat, rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str
