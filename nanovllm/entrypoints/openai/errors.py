"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, with 400 (never FastAPI's 422)
for anything wrong with a request."""
from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          500: "server_error", 503: "service_unavailable"}
_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 413: "request_too_large", 500: "internal_error", 503: "service_unavailable"}

# request fields an engine-side ValueError may name (its message starts with, or mentions, the field)
KNOWN_FIELDS = frozenset({
    "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
    "min_tokens", "logprobs", "top_logprobs", "prompt_logprobs", "skip_special_tokens", "tokens", "model",
    "logit_bias", "allowed_token_ids", "bad_words", "structured_outputs",
})


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODES.get(status, "error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param,
                      "code": code or _CODES.get(status, "error")}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)


def param_from_message(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The first request field a validation message names (``"temperature must be >= 0"`` -> temperature).

    A length error names both the prompt and max_tokens; it is max_tokens' fault unless the prompt alone is too long.
    """
    lengths = re.search(r"prompt \((\d+) tokens\).*max_tokens.*max_model_len \((\d+)\)", message)
    if lengths and int(lengths.group(1)) < int(lengths.group(2)):
        return (renames or {}).get("max_tokens", "max_tokens")
    for word in re.findall(r"[a-z_]+", message):
        if word in KNOWN_FIELDS:
            return (renames or {}).get(word, word)
    return None


def bad_request(exc: ValueError, renames: dict[str, str] | None = None) -> APIError:
    message = str(exc)
    return APIError(400, message, param_from_message(message, renames))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # (a union's branch names, such as "constrained-str" or "list[int]", are no part of the field's path)
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and (isinstance(part, int)
                                                                          or str(part).isidentifier())]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    where = ".".join(loc) if loc else "body"
    if first.get("type") == "extra_forbidden":
        return f"{where}: unknown field (this server implements no such option)", loc[0] if loc else None
    return f"{where}: {first.get('msg', 'invalid value')}", loc[0] if loc else None


def document_errors_as_400(app: FastAPI) -> None:
    """The OpenAPI document says what the server does: a bad request is a 400 with an OpenAI error body (FastAPI
    would document its own 422)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            error = {"description": "Bad request", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/ErrorResponse"}}}}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if operation.get("responses", {}).pop("422", None) is not None:
                        operation["responses"]["400"] = error
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)
