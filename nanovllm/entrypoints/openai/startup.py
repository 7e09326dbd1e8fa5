"""What ``nanovllm serve`` settles before the model loads, so that a mistake costs a second, not a model load.

In order: the engine flags (``EngineConfig``) and ``--override-generation-config``; the port (bound here with
light imports only and handed to uvicorn later, so a busy port fails at once and no other process can take it
meanwhile); ``--chat-template``; the model's generation config, whose default sampling values are checked as
``SamplingParams``. Each failure is a ``ValueError`` naming the flag, which the CLI prints as one line and exits
non-zero. Connections that arrive while the model loads wait in the socket's backlog and are answered once the
server is ready.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.entrypoints.chat_template import load_chat_template
from nanovllm.entrypoints.generation_defaults import GENERATION_CONFIG_MODES, default_sampling, parse_overrides

logger = logging.getLogger(__name__)

BACKLOG = 2048  # uvicorn's default


@dataclass
class ServePlan:
    config: EngineConfig
    sock: socket.socket
    url: str  # http://host:port, for the "ready" line
    chat_template: str | None
    default_sampling: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def prepare_serve(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> ServePlan:
    """Light imports only up to the bind (no torch), so that a busy port fails within a second of the command."""
    started = time.monotonic()
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    config = EngineConfig.from_kwargs(args.model, **engine_kwargs)
    overrides = parse_overrides(args.override_generation_config)
    if args.generation_config not in GENERATION_CONFIG_MODES and not os.path.isdir(
            os.path.expanduser(args.generation_config)):
        raise ValueError(f"--generation-config must be one of {list(GENERATION_CONFIG_MODES)} or a folder, got "
                         f"{args.generation_config!r} (no such folder)")
    sock = bind_socket(args.host, args.port)
    try:
        url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{sock.getsockname()[1]}"
        logger.info("listening on %s (requests wait until the model is ready)", url)
        template = load_chat_template(args.chat_template) if args.chat_template is not None else None
        from nanovllm.loader import resolve_model_path  # (imports torch)

        model_path = resolve_model_path(config.model, config.revision, weights=False)
        defaults = default_sampling(args.generation_config, model_path, overrides)
        logger.info("flags checked in %.2f s", time.monotonic() - started)
    except BaseException:
        sock.close()
        raise
    return ServePlan(config, sock, url, template, defaults, started)


def exit_on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM or ctrl-C while the engine loads, or re-raised by uvicorn after its graceful shutdown: exit through
    the normal path, so that ``finally`` blocks and atexit hooks (which stop the engine core) run, without a
    traceback."""
    sys.exit(128 + signum if signum != signal.SIGTERM else 0)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a busy or forbidden port is a ``ValueError`` naming ``--port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ValueError(f"--port {port}: cannot listen on {host}:{port}: {reason}") from None
