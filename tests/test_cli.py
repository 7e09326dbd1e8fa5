"""The ``nanovllm`` command: ``python -m nanovllm`` subcommands run end to end on the tiny CPU model."""
from __future__ import annotations

import os
import subprocess
import sys

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
