"""Limits on what one HTTP client may cost the server: a bounded request body, and a deadline for sending a request.

uvicorn times out only idle keep-alive connections, so a client that sends half a request head, or a head and then
part of its body, would hold a connection (and a little memory) for ever; a few hundred such clients exhaust the
server. ``ClientTimeoutH11Protocol`` closes a connection whose request head is not complete in time;
``RequestLimits`` (ASGI middleware) answers 408 to a body that is not complete in time and 413 to one that is too
large, before the app ever sees it.
"""
from __future__ import annotations

import asyncio
import time

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanovllm.entrypoints.openai.errors import error_body

DEFAULT_MAX_REQUEST_BYTES = 16 << 20
DEFAULT_CLIENT_TIMEOUT_S = 30.0


def client_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections that take longer than ``timeout_s`` to send a request head."""

    class ClientTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_deadline)

        def _head_deadline(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time (idle keep-alive connections too)

    return ClientTimeoutH11Protocol


class RequestLimits:
    """ASGI middleware: reads each request body first (the app then gets it in one piece); one of more than
    ``max_bytes`` is a 413, one not complete within ``timeout_s`` of the request's start a 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _refuse(send, 413, f"the request body ({int(length)} bytes) is larger than the server's limit of "
                                     f"{self.max_bytes} bytes (--max-request-bytes)")
            return
        deadline = time.monotonic() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                await _refuse(send, 408, f"the request was not received within {self.timeout_s:g} s")
                return
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _refuse(send, 413, f"the request body is larger than the server's limit of {self.max_bytes} "
                                         "bytes (--max-request-bytes)")
                return
            if not message.get("more_body", False):
                break
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()  # then disconnect notices, as they come

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    response = JSONResponse(error_body(status, message), status_code=status, headers={"Connection": "close"})
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
