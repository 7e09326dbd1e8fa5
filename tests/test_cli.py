"""The ``nanovllm`` command: ``python -m nanovllm`` subcommands run end to end on the tiny CPU model."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from server_helpers import REPO_ROOT, startup_limit_s

ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "128"]


def nanovllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The command's run, bounded by a generous limit that grows on a loaded machine."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "nanovllm", *args], input=stdin, capture_output=True, text=True,
                          timeout=startup_limit_s(), env=env)


def test_help_and_version() -> None:
    out = nanovllm("--help")
    assert out.returncode == 0 and all(cmd in out.stdout for cmd in ("serve", "generate", "chat", "bench"))
    serve = nanovllm("serve", "--help")
    for flag in ("--host", "--port", "--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--dtype", "--device", "--enforce-eager", "--seed", "--load-format",
                 "--gpu-memory-utilization", "--tensor-parallel-size", "--enable-prefix-caching",
                 "--no-enable-prefix-caching", "--shutdown-timeout", "--attention-backend"):
        assert flag in serve.stdout, flag
    assert nanovllm("--version").returncode == 0


@pytest.mark.parametrize("bench", ["throughput", "serve"])
def test_bench_subcommands_are_wired(bench: str) -> None:
    out = nanovllm("bench", bench, "--help")
    assert out.returncode == 0, out.stderr
    assert "--" in out.stdout  # the benchmark module's own flags


def test_generate(qwen3_dir: str) -> None:
    out = nanovllm("generate", qwen3_dir, "--prompt", "Once upon a time", "--prompt", "Hello", "--max-tokens", "4",
                   "--temperature", "0", *ENGINE_FLAGS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- ") == 2 and "Once upon a time" in out.stdout


def test_chat_streams_and_exits_on_eof(qwen3_dir: str) -> None:
    out = nanovllm("chat", qwen3_dir, "--max-tokens", "4", "--temperature", "0", *ENGINE_FLAGS,
                   stdin="Hello there\nAnd again\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") >= 3  # two turns answered, then the prompt that read EOF


def test_bad_engine_argument_is_one_line(qwen3_dir: str) -> None:
    out = nanovllm("generate", qwen3_dir, "--prompt", "x", "--device", "cpu", "--max-num-seqs", "0")
    assert out.returncode != 0 and "max_num_seqs" in out.stderr and "Traceback" not in out.stderr


def test_generate_takes_the_model_as_a_flag_and_vllm_dtype_aliases(qwen3_dir: str) -> None:
    flags = [f for f in ENGINE_FLAGS if f not in ("--dtype", "float32")]
    out = nanovllm("generate", "--model", qwen3_dir, "--prompt", "Hello", "--max-tokens", "2", "--dtype", "half",
                   *flags)
    assert out.returncode == 0, out.stderr
    assert "in torch.float16" in out.stderr  # vLLM's "half" is float16
    both = nanovllm("generate", qwen3_dir, "--model", qwen3_dir + "-other", "--prompt", "x")
    assert both.returncode != 0 and "differs" in both.stderr and "Traceback" not in both.stderr


def test_bad_sampling_flag_fails_before_loading(qwen3_dir: str) -> None:
    for command, flag in ((["generate", qwen3_dir, "--prompt", "x"], ["--temperature", "-1"]),
                          (["chat", qwen3_dir], ["--temperature", "-1"]),
                          (["chat", qwen3_dir], ["--chat-template", qwen3_dir + "/missing.jinja"])):
        out = nanovllm(*command, *flag, *ENGINE_FLAGS, stdin="")
        assert out.returncode != 0 and flag[0].lstrip("-") in out.stderr, out.stderr
        assert "config:" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def _user_message_of(tokens: int, model_dir: str, system: str) -> str:
    """A user message whose rendered prompt (with ``system``) has about ``tokens`` tokens, measured with the
    model's own tokenizer and template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words: list[str] = []
    while True:
        words.append(f"fox{len(words) % 7}")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": " ".join(words)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(tokenizer.encode(text, add_special_tokens=False)) >= tokens:
            return " ".join(words)


def test_chat_keeps_a_long_conversation(qwen3_dir: str) -> None:
    """max_model_len 128 and 40 new tokens a turn: the history outgrows the context within a few turns. The chat
    drops old turns, caps a reply that cannot have 40 tokens, skips a message that cannot fit at all, and goes on
    until /exit (the message after it is never read)."""
    system = "You are terse."
    medium = _user_message_of(110, qwen3_dir, system)  # fits, but leaves less than 40 tokens for the reply
    huge = "word " * 2000
    turns = [f"Tell me about the quick brown fox number {i} and the lazy dog." for i in range(8)]
    stdin = "\n".join([*turns, medium, huge, "/clear", "Hello again", "/exit", huge]) + "\n"
    out = nanovllm("chat", qwen3_dir, "--max-tokens", "40", "--temperature", "0", "--ignore-eos", "--system-prompt",
                   system, *ENGINE_FLAGS, stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "failed" not in out.stderr, out.stderr
    dropped = re.findall(r"dropped its (\d+) oldest turn", out.stderr)
    assert dropped and all(int(n) >= 1 for n in dropped), out.stderr
    capped = re.findall(r"max_tokens capped to (\d+) for this reply \(prompt (\d+) tokens, context (\d+)\)", out.stderr)
    assert capped, out.stderr
    for max_tokens, prompt, context in capped:
        assert int(max_tokens) < 40 and int(max_tokens) + int(prompt) == int(context) == 128
    assert out.stderr.count("not sent") == 1  # the huge message before /exit; the one after it is never read
    assert "conversation cleared" in out.stderr


def test_chat_ctrl_c_interrupts_a_reply_and_the_chat_goes_on(qwen3_dir: str) -> None:
    flags = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "1024"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "nanovllm", "chat", qwen3_dir, "--max-tokens", "1000",
                             "--ignore-eos", *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    output = _StreamReader(proc.stdout)
    errors = _StreamReader(proc.stderr)
    deadline = time.monotonic() + startup_limit_s()
    try:
        output.wait_for(lambda text: text.endswith("> "), deadline)
        proc.stdin.write("Tell me a very long story\n")
        proc.stdin.flush()
        prompt_end = len(output.text())
        output.wait_for(lambda text: len(text) > prompt_end, deadline)  # the reply streams
        proc.send_signal(signal.SIGINT)
        output.wait_for(lambda text: "[interrupted]" in text and text.endswith("> "), deadline)
        assert proc.poll() is None  # the chat is still there, back at its prompt
        proc.send_signal(signal.SIGINT)  # at the prompt, ctrl-C quits
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    errors.done(deadline)
    assert code == 0, errors.text()
    assert "Traceback" not in errors.text(), errors.text()


class _StreamReader:
    """A pipe read on a thread, so that waits on its text are bounded."""

    def __init__(self, stream: Any) -> None:
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        while chunk := stream.read(1):
            with self._lock:
                self._chunks.append(chunk)

    def text(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def wait_for(self, condition: Callable[[str], bool], deadline: float) -> None:
        while not condition(self.text()):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError(f"not seen in time; the output so far:\n{self.text()[-2000:]}")
            time.sleep(0.01)

    def done(self, deadline: float) -> None:
        self._thread.join(max(0.0, deadline - time.monotonic()))


def test_readme_serve_commands_parse_and_name_the_served_model() -> None:
    """The README's serve session: every nanovllm command in it parses, and its curl and openai calls ask for the
    model name the server is started with."""
    from nanovllm.entrypoints.cli import build_parser

    readme = (Path(REPO_ROOT) / "README.md").read_text()
    session = readme[readme.index("## Serve"):]
    session = session[:session.index("```", session.index("```bash") + 7)]
    served = re.search(r"nanovllm serve .*--served-model-name (\S+)", session).group(1)
    asked = re.findall(r"""["']model["']\s*[:=]\s*["']([^"']+)["']""", session) + \
        re.findall(r"model='([^']+)'", session)
    assert asked and set(asked) == {served}, (served, asked)
    commands = re.findall(r"^nanovllm (serve|generate|chat) (.*?)(?:&|#|$)", session, flags=re.M)
    assert {c for c, _ in commands} == {"serve", "generate", "chat"}
    for command, rest in commands:
        build_parser(load_benchmarks=False).parse_args([command, *shlex.split(rest.replace('"$MODEL"', "m"))])
