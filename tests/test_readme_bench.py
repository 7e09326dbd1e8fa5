"""Every ``nanovllm bench`` command of the README's Benchmarks section runs: each is read from the README and run as
a subprocess, on the tiny local model (the offline equivalent of its Qwen3-0.6B shape, few prompts) and, for
``bench serve``, against a tiny server on the port the README's server would use. A README edit that breaks a
command, or a flag renamed under it, fails here."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_helpers import REPO_ROOT, ServerProcess, startup_limit_s


def readme_bench_commands() -> list[list[str]]:
    text = (Path(REPO_ROOT) / "README.md").read_text()
    section = text.split("\n## Benchmarks", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            if line.startswith("nanovllm bench "):
                commands.append(shlex.split(line, comments=True))
    return commands


COMMANDS = readme_bench_commands()
OFFLINE = [c for c in COMMANDS if c[2] in ("throughput", "prefix")]
ONLINE = [c for c in COMMANDS if c[2] == "serve"]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "nanovllm", *argv], capture_output=True, text=True, env=env,
                          timeout=startup_limit_s(80))


def test_the_readme_has_bench_commands() -> None:
    assert len(OFFLINE) >= 3 and len(ONLINE) >= 2, COMMANDS


@pytest.mark.parametrize("command", OFFLINE, ids=[" ".join(c[2:]) for c in OFFLINE])
def test_offline_bench_command(command: list[str], qwen3_dir: str) -> None:
    out = run([*command[1:], "--model", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--num-prompts", "2",
               "--disable-tqdm"])
    assert out.returncode == 0, f"exit status {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "device" in out.stdout and "cpu" in out.stdout


@pytest.fixture(scope="module")
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(qwen3_dir, "--max-model-len", "512", "--num-kv-blocks", "256")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("command", ONLINE, ids=[" ".join(c[2:]) for c in ONLINE])
def test_bench_serve_command(command: list[str], server: ServerProcess) -> None:
    argv = command[1:]
    port = argv.index("--port") + 1
    assert argv[port] == "8000"  # the README's server
    argv[port] = str(server.port)
    out = run([*argv, "--num-prompts", "4", "--disable-tqdm"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"Successful requests:\s+4\n", out.stdout) and re.search(r"Failed requests:\s+0\n", out.stdout)
