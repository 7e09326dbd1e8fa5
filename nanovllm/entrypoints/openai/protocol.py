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
    "functions": "functions (the older form of tools) are not supported",
    "function_call": "function_call (the older form of tool_choice) is not supported",
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


class JsonSchemaFormat(RequestModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # OpenAI's: the schema is followed exactly, which a grammar always does


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


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
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs, and vLLM's older guided_* aliases
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


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


class FunctionCall(RequestModel):
    name: str
    arguments: str  # a JSON object, as text


class AssistantToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a role "tool" message: the call it answers
    reasoning_content: str | None = None  # an assistant turn's thinking (templates such as Qwen3's read it)


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # OpenAI's: forced calls follow the schema exactly, which a grammar always does


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


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
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # in UNSUPPORTED
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


class ToolCallFunction(ResponseModel):
    name: str
    arguments: str


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatResponseMessage(ResponseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


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


class DeltaFunction(ResponseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(ResponseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
