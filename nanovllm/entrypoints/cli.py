"""The ``nanovllm`` command (also ``python -m nanovllm``): serve, generate, chat, bench.

Heavy imports (torch, FastAPI) happen inside the subcommands, so ``nanovllm --help`` is instant and the engine-core
process, which re-imports the main module under ``spawn``, pays nothing for the CLI.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from nanovllm.entrypoints.engine_args import add_engine_args, engine_kwargs

logger = logging.getLogger(__name__)


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace, **overrides: Any) -> Any:
    from nanovllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, stop=args.stop, ignore_eos=args.ignore_eos, **overrides)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model, positional (``nanovllm serve MODEL``) or as vLLM also spells it (``--model MODEL``)."""
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                        help="checkpoint directory, GGUF file or Hugging Face hub id")
    parser.add_argument("--model", default=None, help="the model, as a flag (the same as MODEL; give one of them)")


def _resolve_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and tag != args.model:
        parser.error(f"the model is given twice and differs: MODEL {tag!r} and --model {args.model!r}")
    args.model = tag if tag is not None else args.model
    if args.model is None:
        parser.error(f"{args.command} needs a model: MODEL or --model")


# ---- serve --------------------------------------------------------------------------------------------------------

def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve MODEL over an OpenAI-compatible HTTP API.")
    _add_model_args(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="bound before the model loads (a busy port fails at once)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients may ask for (default: MODEL)")
    p.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes and /tokenizer_info "
                        "(default: $NANOVLLM_API_KEY)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="largest request body accepted; larger ones get 413 (default: 16 MiB)")
    p.add_argument("--client-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (head and body); then 408 or the connection "
                        "closes")
    p.add_argument("--chat-template", default=None,
                   help="chat template for chat requests in place of the tokenizer's: a file, or the Jinja template "
                        "itself")
    p.add_argument("--generation-config", default="auto",
                   help="default sampling values of requests: auto = the model's generation_config.json, vllm = "
                        "none (vLLM's neutral defaults), or a folder holding a generation_config.json "
                        "(default: auto)")
    p.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help='sampling defaults that replace the generation config\'s, e.g. \'{"temperature": 0.5}\' '
                        "(keys: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests supply their own chat template (it is code the server runs)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    p.add_argument("--tool-call-parser", choices=["hermes", "llama3_json"], default=None,
                   help="the model's tool-call format: hermes (Qwen2.5, Qwen3), llama3_json (Llama 3.1, 3.2)")
    p.add_argument("--reasoning-parser", choices=["qwen3"], default=None,
                   help="return the model's thinking (<think>...</think>) as reasoning_content")
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (the tokenizer's config and chat template, for lm-eval)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from nanovllm.entrypoints.openai.startup import prepare_serve

    plan = prepare_serve(args, engine_kwargs(args))  # flags checked and the port bound before the heavy imports
    from nanovllm.entrypoints.openai.api_server import run_server

    run_server(args, plan)


# ---- generate -----------------------------------------------------------------------------------------------------

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts and print them")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    _add_sampling_args(p, max_tokens=128)
    add_engine_args(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from nanovllm.llm import LLM

    params = _sampling_params(args, n=args.n)  # a bad sampling flag fails before the model loads
    llm = LLM(args.model, **engine_kwargs(args))
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for prompt, out in zip(args.prompt, outputs):
        for completion in out.outputs:
            print(f"--- {prompt!r} -> [{completion.finish_reason}]")
            print(prompt + completion.text)


# ---- chat ---------------------------------------------------------------------------------------------------------

def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive streaming chat in the terminal (/clear, /exit or ctrl-D to quit)",
                       description="Chat with MODEL in the terminal. The conversation is kept: when it no longer "
                                   "fits the context, its oldest turns are dropped (the system prompt stays) and "
                                   "max_tokens is capped to the room left. /clear starts over, /exit (or ctrl-D) "
                                   "quits, ctrl-C interrupts a reply (and quits at the prompt).")
    _add_model_args(p)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--chat-template", default=None,
                   help="chat template in place of the tokenizer's: a file, or the Jinja template itself")
    _add_sampling_args(p, max_tokens=512)
    add_engine_args(p)
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> None:
    import asyncio
    from dataclasses import replace

    from nanovllm.engine.async_llm import AsyncLLM, RequestFailedError
    from nanovllm.entrypoints.chat_history import MessageTooLong, fit_conversation
    from nanovllm.entrypoints.chat_template import apply_chat_template, load_chat_template

    params = _sampling_params(args)  # bad flags fail before the model loads
    template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    engine = AsyncLLM.from_engine_args(args.model, **engine_kwargs(args))
    try:
        if template is not None:
            apply_chat_template(engine.tokenizer, template)
        if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; pass one with --chat-template")
        intake = engine.input_processor
        context = intake.max_request_tokens
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        history = list(system)
        reply_parts: list[str] = []

        async def reply(prompt_ids: list[int], turn_params: Any) -> None:
            async for out in engine.generate(prompt_ids, turn_params):
                delta = out.outputs[0].text if out.outputs else ""
                print(delta, end="", flush=True)
                reply_parts.append(delta)

        print("chatting with", args.model, "(/clear starts over, /exit or ctrl-D quits, ctrl-C interrupts a reply)")
        while True:
            try:
                line = input("\n> ")
            except EOFError:
                print()
                return
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                return
            if command == "/clear":
                history = list(system)
                logger.info("conversation cleared")
                continue
            try:
                fitted = fit_conversation(history + [{"role": "user", "content": line}], intake.render_chat,
                                          intake, params.max_tokens)
            except MessageTooLong as exc:
                logger.warning("not sent: %s", exc)
                continue
            if fitted.dropped_turns:
                logger.warning("the conversation no longer fits the context (%d tokens): dropped its %d oldest "
                               "turn(s)", context, fitted.dropped_turns)
            if fitted.max_tokens < params.max_tokens:
                logger.warning("max_tokens capped to %d for this reply (prompt %d tokens, context %d)",
                               fitted.max_tokens, len(fitted.prompt_ids), context)
            reply_parts.clear()
            try:
                # one loop per turn; AsyncLLM rebinds when idle
                asyncio.run(reply(fitted.prompt_ids, replace(params, max_tokens=fitted.max_tokens)))
            except KeyboardInterrupt:  # the task was cancelled, which aborted the request
                print(" [interrupted]", end="")
            except (RequestFailedError, ValueError) as exc:
                logger.error("this reply failed: %s", exc)
                continue
            print()
            history = fitted.messages + [{"role": "assistant", "content": "".join(reply_parts)}]
    except KeyboardInterrupt:
        print()
    finally:
        engine.shutdown()


# ---- bench --------------------------------------------------------------------------------------------------------

def _add_bench(sub: argparse._SubParsersAction, load: bool) -> None:
    """``load``: import the benchmark modules for their flags (only when the command is ``bench``: they pull in
    torch, which other commands should not wait for just to parse their arguments)."""
    p = sub.add_parser("bench", help="benchmarks: offline throughput, prefix cache, online serving latency")
    bench = p.add_subparsers(dest="bench", metavar="{throughput,prefix,serve}", required=True)
    for name, module, help_text in (
        ("throughput", "nanovllm.benchmarks.throughput", "offline generation throughput (LLM.generate)"),
        ("prefix", "nanovllm.benchmarks.shared_prefix", "a shared system prompt with the prefix cache on and off"),
        ("serve", "nanovllm.benchmarks.serve", "latency and throughput of an OpenAI-compatible server"),
    ):
        bp = bench.add_parser(name, help=help_text)
        if not load:
            continue
        try:
            mod = __import__(module, fromlist=["add_arguments", "main"])
        except ImportError as exc:
            bp.set_defaults(func=_missing(module, exc))
            bp.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        mod.add_arguments(bp)
        bp.set_defaults(func=mod.main)


def _missing(module: str, exc: ImportError) -> Callable[[argparse.Namespace], None]:
    def fail(_: argparse.Namespace) -> None:
        sys.exit(f"this benchmark needs {module}, which could not be imported: {exc}")

    return fail


# ---- main ---------------------------------------------------------------------------------------------------------

def build_parser(load_benchmarks: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="nano-vLLM: a small, fast LLM inference engine")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,chat,bench}", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_chat(sub)
    _add_bench(sub, load_benchmarks)
    return parser


def _version() -> str:
    from nanovllm.version import __version__

    return __version__


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("NANOVLLM_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(load_benchmarks=argv[:1] == ["bench"])
    args = parser.parse_args(argv)
    if args.command in ("serve", "generate", "chat"):
        _resolve_model(args, parser)
    try:
        args.func(args)
    except ValueError as exc:  # bad engine arguments and the like: one line, not a traceback
        logger.debug("command failed", exc_info=True)
        sys.exit(f"error: {exc}")
