"""``GET /tokenizer_info``, as vLLM serves it: the tokenizer's configuration, the ``tokenizer_config.json`` a client
would otherwise fetch from the hub, so that a client (lm-evaluation-harness's ``local-completions`` and
``local-chat-completions``) needs nothing but the server.

The body is the tokenizer's init arguments (special tokens as their text, ``model_max_length``, ...) without the
paths of its vocabulary files, with the special tokens and the chat template the server uses (should they have
changed since), plus ``tokenizer_class``. lm-eval reads ``eos_token``, ``bos_token``, ``pad_token`` and
``chat_template`` from it, and asks ``/tokenize`` and ``/detokenize`` for the rest. Beyond vLLM's body, ``vocab_size``:
the ids below it are tokens of the tokenizer that the model takes, so that ``nanovllm bench serve`` can send random
token-id prompts of exact lengths with no local tokenizer (vLLM's body has no size of the vocabulary).

Like vLLM, the server serves it only when started with ``--enable-tokenizer-info-endpoint`` (it shows the chat
template and tokenizer settings), and, when the server has an API key, only to requests that bear it (the
server's gate checks it, as for /v1, /tokenize and /detokenize).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from nanovllm.entrypoints.openai.errors import APIError
from nanovllm.entrypoints.openai.protocol import ErrorResponse

PATH = "/tokenizer_info"
_FILE_KEYS = ("vocab_file", "merges_file", "tokenizer_file")  # paths on the server, of no use to a client


class TokenizerInfoResponse(BaseModel):
    """The tokenizer's configuration: ``tokenizer_class`` and whatever else its ``tokenizer_config.json`` holds."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


def tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """The JSON body of ``/tokenizer_info`` for ``tokenizer`` (a transformers tokenizer)."""
    config = {key: value for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if key not in _FILE_KEYS}
    config.update(getattr(tokenizer, "special_tokens_map", None) or {})  # the special tokens in use
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added:  # the tokenizer's own table: its init arguments hold it only when it was read from a saved config
        config["added_tokens_decoder"] = added
    config = _json_value(config)
    config["tokenizer_class"] = type(tokenizer).__name__
    if getattr(tokenizer, "chat_template", None):  # the template in use, should the server have replaced it
        config["chat_template"] = tokenizer.chat_template
    return config


def _json_value(value: Any) -> Any:
    """Special tokens (``AddedToken``) as their text; containers element by element; any other non-JSON value as its
    ``str``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_value(item) for item in value]
    return str(value)


def add_tokenizer_info_route(app: FastAPI, tokenizer: Any, model_vocab_size: int) -> None:
    """Serve ``GET /tokenizer_info`` from ``app`` (when the endpoint is enabled; the server's gate checks the API
    key). ``model_vocab_size``: the token ids the model takes (the tokenizer may know more, or fewer)."""
    body: bytes | None = None

    @app.get(PATH, response_model=TokenizerInfoResponse, responses={
        401: {"description": "The server has an API key and the request does not bear it.", "model": ErrorResponse},
    })
    async def get_tokenizer_info() -> Response:
        nonlocal body
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if body is None:  # the tokenizer does not change while the server runs
            info = tokenizer_config(tokenizer) | {"vocab_size": min(len(tokenizer), model_vocab_size)}
            body = TokenizerInfoResponse(**info).model_dump_json().encode()
        return Response(body, media_type="application/json")
