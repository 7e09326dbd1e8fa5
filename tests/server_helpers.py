"""A real ``nanovllm serve`` on a free loopback port, for tests: started, waited for, and always stopped.

Every wait is bounded, so that a broken server fails a test instead of hanging CI, and waits for something to
happen (never a fixed time). The bounds grow with how slow this machine is right now (``startup_limit_s``), so
that a loaded laptop or a shared CI machine passes the same tests as an idle one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = str(Path(__file__).resolve().parents[1])
API_KEY = "test-key"


def _measured_startup_s() -> float:
    """How long this test process took to start, up to the first import of this module (during collection, after
    conftest imported torch): the interpreter, pytest and ``import torch``, the bulk of what starting a server, an
    engine core or a parallel worker costs too. A loaded machine measures longer."""
    try:
        elapsed = time.time() - psutil.Process().create_time()
    except psutil.Error:
        elapsed = 10.0
    return min(60.0, max(1.0, elapsed))  # (a long-lived process importing this late is no measure of speed)


STARTUP_S = _measured_startup_s()


def startup_limit_s(multiple: float = 40.0) -> float:
    """A generous bound for a wait that normally takes one start-up or less (a server's start, a process's exit, an
    HTTP answer, a short generation): ``multiple`` times this process's measured start-up, and at least two
    minutes. It only bounds a broken test; one that works returns as soon as what it waits for happens."""
    return max(120.0, multiple * STARTUP_S)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m nanovllm serve MODEL`` in a subprocess (CPU, float32), healthy when the constructor returns."""

    def __init__(self, model: str, *args: str, api_key: str | None = None,
                 startup_timeout_s: float | None = None) -> None:
        self.api_key = api_key
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="nanovllm-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "nanovllm", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--device", "cpu", "--dtype", "float32", "--uvicorn-log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("NANOVLLM_API_KEY", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._known_children: dict[int, psutil.Process] = {}
        try:
            self._wait_healthy(startup_limit_s() if startup_timeout_s is None else startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.request("GET", "/health", timeout_s=max(1.0, deadline - time.monotonic()))
                if status == 200:
                    self.remember_children()
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s:\n{self.log()}")

    def wait_not_serving(self, timeout_s: float | None = None) -> None:
        """After a shutdown signal: until ``/health`` no longer answers 200 (503 while draining, or the port is
        closed), so that the server is known to have taken the signal."""
        timeout_s = startup_limit_s() if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health", timeout_s=max(1.0, deadline - time.monotonic()))[0] != 200:
                    return
            except OSError:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the server still serves {timeout_s:.0f} s after the signal:\n{self.log()}")

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def remember_children(self) -> list[psutil.Process]:
        """The server's descendants now (engine core, resource tracker), kept to check they die with it."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            self._known_children.setdefault(child.pid, child)
        return children

    def engine_core_pid(self) -> int:
        for child in self.remember_children():
            if "spawn_main" in " ".join(child.cmdline()):
                return child.pid
        raise RuntimeError("no engine-core child found")

    def surviving_children(self, timeout_s: float | None = None) -> list[psutil.Process]:
        """The remembered descendants still alive once each had up to ``timeout_s`` (default: a generous limit;
        they are normally gone at once) to exit."""
        timeout_s = startup_limit_s() if timeout_s is None else timeout_s
        _, alive = psutil.wait_procs(list(self._known_children.values()), timeout=timeout_s)
        return alive

    def request(self, method: str, path: str, body: Any = None, timeout_s: float | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One HTTP call; returns (status, parsed JSON or text). Raises OSError when no answer comes within
        ``timeout_s`` (default: a generous limit)."""
        timeout_s = startup_limit_s() if timeout_s is None else timeout_s
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def metrics(self) -> dict[str, float]:
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float | None = None) -> int | None:
        """Signal the server, wait for it (default: a generous limit; it normally exits within its shutdown
        timeout), kill it (and any known child) if it does not exit in time."""
        if self.proc.poll() is None:
            self.remember_children()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(startup_limit_s() if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(startup_limit_s())
        for child in self.surviving_children(timeout_s=5.0):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        return self.proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with its non-model labels: value} (the model_name label is dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r',?model_name="[^"]*"', "", name).replace("{,", "{").replace("{}", "")
        out[name] = float(value)
    return out
