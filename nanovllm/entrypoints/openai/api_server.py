"""The OpenAI-compatible HTTP server: a FastAPI app over one ``AsyncLLM``, run by uvicorn.

Shutdown (SIGTERM or ctrl-C): uvicorn stops accepting connections and lets open ones finish; new requests that still
arrive on open connections get 503. Requests still running ``--shutdown-timeout`` seconds later are failed with a
clean error (a 503, or an error event and ``[DONE]`` in a stream), then the engine-core process is stopped, so the
server exits with no child left behind.

Engine death (the core process is gone): in-flight requests get an error at once, ``/health`` answers 503, and the
server exits with status 1 within a few seconds, so that a supervisor restarts it.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from nanovllm.engine.async_llm import AsyncLLM, EngineDeadError
from nanovllm.entrypoints.chat_template import apply_chat_template
from nanovllm.entrypoints.openai.errors import APIError, document_errors_as_400, error_body, install_error_handlers
from nanovllm.entrypoints.openai.http_limits import (
    DEFAULT_CLIENT_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_BYTES,
    RequestLimits,
    client_timeout_protocol,
)
from nanovllm.entrypoints.openai.metrics import install_metrics
from nanovllm.entrypoints.openai.protocol import (
    ErrorResponse,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from nanovllm.entrypoints.openai.serving_chat import OpenAIServingChat
from nanovllm.entrypoints.openai.serving_completion import OpenAIServingCompletion, json_response
from nanovllm.entrypoints.openai.startup import ServePlan
from nanovllm.entrypoints.openai.tokenizer_info import add_tokenizer_info_route
from nanovllm.version import __version__

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_root: str = ""
    api_key: str | None = None
    shutdown_timeout_s: float = 30.0
    shutdown_engine_on_exit: bool = True  # False when the caller owns the engine (tests, embedding)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    trust_request_chat_template: bool = False
    tool_call_parser: str | None = None  # the model's tool-call format (tool_choice "auto")
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    # what a request leaves out (from the model's generation config: see entrypoints/generation_defaults.py)
    default_sampling: dict[str, Any] = field(default_factory=dict)
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info, as vLLM's flag of that name
    draining: bool = False
    draining_since: float = field(default=0.0, repr=False)
    exit_code: int = 0
    request_exit: Callable[[], None] | None = field(default=None, repr=False)  # set by the server that runs the app

    def start_draining(self) -> None:
        if not self.draining:
            self.draining, self.draining_since = True, time.monotonic()
            logger.info("shutting down: no new requests; in-flight ones get up to %.0f s", self.shutdown_timeout_s)


# what the API key guards besides /v1: the routes that run the tokenizer or describe it
_KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})


class _Gate:
    """ASGI middleware: the API key on /v1 and the tokenizer routes (health, metrics and version stay open, for
    probes and scrapers), and 503 for new work while draining."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.expected is not None and (scope["path"].startswith("/v1") or scope["path"] in _KEYED_PATHS):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    response = JSONResponse(error_body(401, "missing or invalid API key (Authorization: Bearer ...)"),
                                            status_code=401)
                    await response(scope, receive, send)
                    return
            if self.settings.draining and scope["method"] == "POST":
                await JSONResponse(error_body(503, "the server is shutting down"), status_code=503)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _exit_when_engine_dies(engine: AsyncLLM, settings: ServerSettings) -> None:
    """A dead engine core serves no one: once in-flight requests have had their errors, exit non-zero."""
    while engine.is_healthy:
        await asyncio.sleep(0.2)
    logger.error("the engine core is gone; the server exits so that its supervisor can restart it")
    settings.exit_code = 1
    settings.start_draining()
    await asyncio.sleep(0.5)  # the error events of open streams are on their way out
    if settings.request_exit is not None:
        settings.request_exit()


async def _drain_watchdog(engine: AsyncLLM, settings: ServerSettings) -> None:
    """Once draining, give in-flight requests ``shutdown_timeout_s``, then fail the rest with a clean error."""
    while not settings.draining:
        await asyncio.sleep(0.1)
    deadline = settings.draining_since + settings.shutdown_timeout_s
    while engine.num_unfinished_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if engine.num_unfinished_requests:
        logger.warning("stopping %d requests still running after the shutdown timeout",
                       engine.num_unfinished_requests)
        engine.abort_all(EngineDeadError("the server is shutting down"))


def build_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watchdogs = [asyncio.create_task(_drain_watchdog(engine, settings)),
                     asyncio.create_task(_exit_when_engine_dies(engine, settings))]
        try:
            yield
        finally:
            settings.start_draining()
            for watchdog in watchdogs:
                watchdog.cancel()
            if engine.num_unfinished_requests:
                engine.abort_all(EngineDeadError("the server is shutting down"))
            if settings.shutdown_engine_on_exit:
                engine.shutdown()

    app = FastAPI(title="nano-vLLM OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    install_error_handlers(app)
    document_errors_as_400(app)
    app.add_middleware(RequestLimits, max_bytes=settings.max_request_bytes, timeout_s=settings.client_timeout_s)
    app.add_middleware(_Gate, settings=settings)  # outermost: refuse before reading a body
    completions = OpenAIServingCompletion(engine, settings.served_model_names)
    chat = OpenAIServingChat(engine, settings.served_model_names, settings.trust_request_chat_template,
                             settings.tool_call_parser, settings.enable_auto_tool_choice, settings.reasoning_parser)
    completions.default_sampling = chat.default_sampling = settings.default_sampling

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The engine is running (an empty body)."},
        503: {"description": "The engine is not running, or the server is shutting down.", "model": ErrorResponse},
    })
    async def health() -> Response:
        if not engine.is_healthy:
            return JSONResponse(error_body(503, "the engine process is not running"), status_code=503)
        if settings.draining:
            return JSONResponse(error_body(503, "the server is shutting down"), status_code=503)
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> Response:
        return json_response(VersionResponse(version=__version__))

    install_metrics(app, engine, completions.model_name)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Response:
        cards = [ModelCard(id=name, root=settings.model_root or name, max_model_len=engine.max_model_len)
                 for name in settings.served_model_names]
        return json_response(ModelList(data=cards))

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: TokenizeRequest) -> Response:
        chat.check_model(request.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            _, tokens = await chat.render_chat(request.messages, request.add_generation_prompt)
        else:
            try:
                tokens = await engine.run_in_intake(engine.input_processor.encode, request.prompt,
                                                    request.add_special_tokens)
            except ValueError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        return json_response(TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens))

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: DetokenizeRequest) -> Response:
        chat.check_model(request.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        vocab = engine.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return json_response(DetokenizeResponse(prompt=await engine.run_in_intake(engine.tokenizer.decode,
                                                                                 request.tokens)))

    if settings.enable_tokenizer_info_endpoint:
        add_tokenizer_info_route(app, engine.tokenizer, engine.vocab_size)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, told when a shutdown signal arrives so that the app can start draining."""

    def __init__(self, config: uvicorn.Config, settings: ServerSettings, url: str = "",
                 started: float | None = None) -> None:
        super().__init__(config)
        self.settings = settings
        self.url = url
        self.start_time = time.monotonic() if started is None else started  # (uvicorn's own `started` is a bool)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            logger.info("ready on %s (%.1f s after start)", self.url, time.monotonic() - self.start_time)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.settings.start_draining()
        super().handle_exit(sig, frame)

    def exit_soon(self) -> None:
        """Stop serving (the engine died): connections get a moment to close, then the server exits regardless."""
        self.should_exit = True
        asyncio.get_running_loop().call_later(2.0, setattr, self, "force_exit", True)


def run_server(args: argparse.Namespace, plan: ServePlan) -> None:
    """``nanovllm serve`` once ``startup.prepare_serve`` has checked the flags and bound the port: start the engine
    core (config, weights, KV cache and CUDA graphs log their times), then serve until a signal."""
    try:
        engine = AsyncLLM(plan.config)
    except BaseException:
        plan.sock.close()
        raise
    try:
        if plan.chat_template is not None:
            apply_chat_template(engine.tokenizer, plan.chat_template)
        names = args.served_model_name or [args.model]
        settings = ServerSettings(
            served_model_names=names, model_root=args.model, api_key=args.api_key,
            shutdown_timeout_s=args.shutdown_timeout, max_request_bytes=args.max_request_bytes,
            client_timeout_s=args.client_timeout, trust_request_chat_template=args.trust_request_chat_template,
            tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
            reasoning_parser=args.reasoning_parser, default_sampling=plan.default_sampling,
            enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        )
        app = build_app(engine, settings)
        config = uvicorn.Config(
            app, log_level=args.uvicorn_log_level,
            # uvicorn's own limit comes after ours, which fails the stragglers cleanly first
            timeout_graceful_shutdown=args.shutdown_timeout + 5, timeout_keep_alive=5,
            http=client_timeout_protocol(args.client_timeout),
        )
        server = _Server(config, settings, plan.url, plan.started)
        settings.request_exit = server.exit_soon
        server.run(sockets=[plan.sock])
    finally:
        plan.sock.close()
        engine.shutdown()
    if settings.exit_code:
        sys.exit(settings.exit_code)
