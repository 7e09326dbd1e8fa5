"""Server scenarios on loopback: a cancellation flood, SIGTERM under load, a dying engine, and schema fuzzing.

No scenario depends on how fast this machine is: each waits for what it needs (a stream's first event, the server
taking a signal), and every wait is bounded by ``startup_limit_s``, which grows on a loaded machine."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from server_helpers import ServerProcess, startup_limit_s

SMALL_SERVER = ("--max-model-len", "512", "--num-kv-blocks", "256")


@pytest.fixture(scope="module")
def short_server(qwen3_dir: str) -> Iterator[ServerProcess]:
    """A short max_model_len, so that fuzzed requests without max_tokens (chat's default: the rest of the context)
    stay quick on CPU."""
    srv = ServerProcess(qwen3_dir, "--max-model-len", "48", "--num-kv-blocks", "128")
    try:
        yield srv
    finally:
        srv.stop()


# ---- raw clients --------------------------------------------------------------------------------------------------

async def _stream_then_hang_up(port: int, body: dict, linger_s: float) -> int:
    """POST a streaming request, read until its first event (the request is running), then ``linger_s`` seconds
    more, then drop the connection; returns bytes read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    received = b""

    async def first_event() -> None:
        nonlocal received
        while b"data: " not in received:
            chunk = await reader.read(4096)
            assert chunk, f"the stream ended before its first event: {received[-300:]!r}"
            received += chunk

    async def read() -> None:
        nonlocal received
        while chunk := await reader.read(4096):
            received += chunk

    try:
        await first_event()  # (bounded by the caller's limit on the whole flood)
        await asyncio.wait_for(read(), linger_s)
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (asyncio.TimeoutError, ConnectionError):
            pass
    return len(received)


class SSEStream:
    """A streaming completion read in a thread with http.client (which undoes the chunked encoding)."""

    def __init__(self, port: int, body: dict, timeout_s: float | None = None) -> None:
        timeout_s = startup_limit_s() if timeout_s is None else timeout_s
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.first_event = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port, body, timeout_s), daemon=True)
        self._thread.start()

    def _run(self, port: int, body: dict, timeout_s: float) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            while line := resp.readline():
                line = line.decode().strip()
                if line.startswith("data: "):
                    self.events.append(line[len("data: "):])
                    self.first_event.set()
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            self.first_event.set()

    def wait_first_event(self) -> None:
        assert self.first_event.wait(startup_limit_s()) and self.events, self.error

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(startup_limit_s() if timeout_s is None else timeout_s)
        assert not self._thread.is_alive(), "stream did not end"

    @property
    def finish_reasons(self) -> list[str]:
        reasons = []
        for event in self.events[:-1]:
            for choice in json.loads(event).get("choices", []):
                if choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
        return reasons

    @property
    def errors(self) -> list[dict]:
        return [json.loads(e)["error"] for e in self.events[:-1] if "error" in json.loads(e)]


def _wait_for_metrics(server: ServerProcess, want: dict[str, float]) -> dict[str, float]:
    """The server's metrics once they show ``want`` (or, after a generous limit, as they are)."""
    deadline = time.monotonic() + startup_limit_s()
    while True:
        metrics = server.metrics()
        if all(metrics.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


# ---- scenarios ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(qwen3_dir, *SMALL_SERVER)
    try:
        yield srv
    finally:
        srv.stop()


def test_cancellation_flood(server: ServerProcess) -> None:
    rng = random.Random(0)
    before = server.metrics()

    async def flood() -> list[int]:
        return await asyncio.gather(*(
            _stream_then_hang_up(server.port, {
                "prompt": f"request {i}: " + "the quick brown fox " * rng.randint(1, 8),
                "max_tokens": rng.randint(300, 400), "ignore_eos": True, "stream": True,  # fits max_model_len
            }, linger_s=rng.uniform(0.0, 0.2))
            for i in range(40)
        ))

    asyncio.run(asyncio.wait_for(flood(), startup_limit_s()))
    status, body = server.request("POST", "/v1/completions", {"prompt": "fresh", "max_tokens": 8})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    metrics = _wait_for_metrics(server, {"nanovllm:kv_cache_used_pages": 0, "nanovllm:num_requests_running": 0,
                                         "nanovllm:num_requests_waiting": 0})
    assert metrics["nanovllm:kv_cache_used_pages"] == 0, metrics
    assert metrics["nanovllm:kv_cache_usage_perc"] == 0.0
    assert metrics["nanovllm:num_requests_running"] == 0 and metrics["nanovllm:num_requests_waiting"] == 0
    aborted = 'nanovllm:request_success_total{finished_reason="abort"}'
    finished = 'nanovllm:request_success_total{finished_reason="length"}'
    num_aborted = metrics[aborted] - before.get(aborted, 0)
    num_finished = metrics[finished] - before.get(finished, 0) - 1  # the fresh request
    # every request ran (each client saw its first event); hung up on, they were aborted, not run to the end (a few
    # may finish first: their clients read on a little while after the first event)
    assert num_aborted + num_finished == 40 and num_aborted >= 30, (num_aborted, num_finished)


def test_schema_fuzzing(short_server: ServerProcess) -> None:
    """schemathesis cases from the server's own OpenAPI document: never a 5xx, never a hang."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(short_server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/health"}
    num_cases = 0
    for operation in operations:
        has_body = operation.method.upper() == "POST"  # the GETs take no input that could be made invalid
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_body else (GenerationMode.POSITIVE,):
            examples = 12 if has_body else 2

            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                nonlocal num_cases
                num_cases += 1
                response = case.call(base_url=short_server.base_url, timeout=startup_limit_s())
                assert response.status_code < 500, (
                    f"{case.method} {case.path} body={case.body!r} -> {response.status_code}: {response.text[:300]}"
                )

            check()
    assert num_cases >= 40
    assert short_server.request("GET", "/health")[0] == 200
    metrics = _wait_for_metrics(short_server, {"nanovllm:num_requests_running": 0})
    assert metrics["nanovllm:num_requests_running"] == 0


def _refuses_new_work(srv: ServerProcess) -> None:
    """After SIGTERM: once the server took the signal, a new request finds the port closed or gets a 503."""
    srv.wait_not_serving()
    try:
        status, _ = srv.request("POST", "/v1/completions", {"prompt": "late", "max_tokens": 2})
        assert status == 503
    except OSError:
        pass


def test_sigterm_drains_in_flight_requests(qwen3_dir: str) -> None:
    """Requests running at SIGTERM finish normally; the server then exits 0 and leaves no child. The shutdown
    timeout is generous, so nothing here depends on how fast this machine generates."""
    srv = ServerProcess(qwen3_dir, *SMALL_SERVER, "--shutdown-timeout", f"{startup_limit_s():.0f}")
    try:
        streams = [SSEStream(srv.port, {"prompt": f"short {i}", "max_tokens": 16 * (i + 1), "stream": True,
                                        "ignore_eos": True}) for i in range(4)]
        for stream in streams:
            stream.wait_first_event()
        assert srv.remember_children(), "the server should have an engine-core child"
        srv.proc.send_signal(signal.SIGTERM)
        _refuses_new_work(srv)
        for stream in streams:
            stream.join()
            assert stream.error is None and stream.status == 200
            assert stream.events[-1] == "[DONE]"
            assert stream.finish_reasons == ["length"] and not stream.errors, stream.events[-3:]
        assert srv.proc.wait(startup_limit_s()) == 0
        assert not srv.surviving_children(), "a child process outlived the server"
    finally:
        srv.stop()


def test_sigterm_stops_requests_at_the_shutdown_timeout(qwen3_dir: str) -> None:
    """Requests still running when the shutdown timeout ends (here at once) each get one clean error event and
    ``[DONE]``; the server exits 0 and leaves no child."""
    srv = ServerProcess(qwen3_dir, *SMALL_SERVER, "--shutdown-timeout", "0")
    try:
        streams = [SSEStream(srv.port, {"prompt": f"long {i}", "max_tokens": 480, "stream": True,
                                        "ignore_eos": True}) for i in range(2)]
        for stream in streams:
            stream.wait_first_event()
        assert srv.remember_children(), "the server should have an engine-core child"
        srv.proc.send_signal(signal.SIGTERM)
        _refuses_new_work(srv)
        for stream in streams:
            stream.join()
            assert stream.error is None and stream.status == 200
            assert stream.events[-1] == "[DONE]"
            # (480 tokens cannot be generated in the tenth of a second the server gives them)
            (error,) = stream.errors
            assert not stream.finish_reasons and "shutting down" in error["message"], stream.events[-3:]
        assert srv.proc.wait(startup_limit_s()) == 0
        assert not srv.surviving_children(), "a child process outlived the server"
    finally:
        srv.stop()


def test_engine_death_mid_stream(qwen3_dir: str) -> None:
    srv = ServerProcess(qwen3_dir, *SMALL_SERVER)
    try:
        core_pid = srv.engine_core_pid()
        stream = SSEStream(srv.port, {"prompt": "doomed", "max_tokens": 400, "stream": True, "ignore_eos": True})
        stream.wait_first_event()
        os.kill(core_pid, signal.SIGKILL)
        stream.join()
        assert stream.status == 200 and stream.events[-1] == "[DONE]"
        (error,) = stream.errors  # one error event, then [DONE]
        assert "engine core process died" in error["message"]
        # the server is on its way out (it exits a moment after its streams had their errors): until it is gone it
        # refuses work; how long that is depends on this machine, so either answer is right
        for method, path, body in (("GET", "/health", None),
                                   ("POST", "/v1/completions", {"prompt": "after", "max_tokens": 2})):
            try:
                status, answer = srv.request(method, path, body)
                assert status == 503 and "error" in answer, (path, status, answer)
            except OSError:  # gone already
                pass
        assert srv.proc.wait(startup_limit_s()) == 1  # so that a supervisor restarts it
        assert not srv.surviving_children()
    finally:
        srv.stop()


def test_killed_server_leaves_no_child(qwen3_dir: str) -> None:
    """A server that dies without cleaning up (SIGKILL) still takes its engine core with it (parent-death checks)."""
    srv = ServerProcess(qwen3_dir, "--max-model-len", "48", "--num-kv-blocks", "16")
    try:
        assert srv.remember_children()
        srv.proc.kill()
        srv.proc.wait(startup_limit_s())
        assert not srv.surviving_children(), "the engine core outlived a killed server"
    finally:
        srv.stop()


def test_parallel_clients_get_their_own_outputs(short_server: ServerProcess) -> None:
    """Concurrent requests batched together: each answer belongs to its own request (echo shows whose)."""
    prompts = [f"client {i} says" for i in range(8)]

    def ask(prompt: str) -> tuple[int, dict]:
        return short_server.request("POST", "/v1/completions",
                                    {"prompt": prompt, "max_tokens": 6, "echo": True, "ignore_eos": True})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts))
    for prompt, (status, body) in zip(prompts, results):
        assert status == 200, body
        assert body["choices"][0]["text"].startswith(prompt) and body["usage"]["completion_tokens"] == 6


def test_bench_serve_against_the_server(short_server: ServerProcess, qwen3_dir: str, tmp_path) -> None:  # noqa: ANN001
    """``nanovllm bench serve`` end to end (parsed by the real CLI), for each dataset, with a saved result."""
    from nanovllm.entrypoints.cli import build_parser

    common = ["bench", "serve", "--base-url", short_server.base_url, "--tokenizer", qwen3_dir]
    runs = {
        "random": ["--num-prompts", "6", "--random-input-len", "16", "--random-output-len", "4",
                   "--request-rate", "50", "--max-concurrency", "4", "--goodput", "ttft:60000", "tpot:60000"],
        "shared-prefix": ["--num-prompts", "6", "--shared-prefix-groups", "2", "--shared-prefix-len", "16",
                          "--shared-suffix-len", "4", "--random-output-len", "3"],
        "incast": ["--incast-background", "2", "--incast-burst", "3", "--incast-burst-input-len", "30",
                   "--incast-background-input-len", "4", "--incast-background-output-len", "4",
                   "--incast-burst-output-len", "2", "--incast-warmup", "0.5", "--incast-cooldown", "0.2"],
    }
    for dataset, extra in runs.items():
        path = tmp_path / f"{dataset}.json"
        args = build_parser().parse_args([*common, "--dataset", dataset, "--save-result", str(path), *extra])
        report = args.func(args)
        saved = json.loads(path.read_text())
        assert saved["dataset"] == dataset and saved["model"] == report["model"]
        if dataset == "incast":
            during = saved["background_during_burst"]
            assert saved["burst"]["completed"] == 3 and during["completed"] >= 1
            assert during["worst_inter_token_gap_ms"] >= 0 and during["worst_ttft_ms"] > 0
        else:
            summary = saved["summary"]
            assert summary["completed"] == 6 and summary["failed"] == 0, summary
            assert set(summary["ttft"]) == {"mean_ms", "median_ms", "p99_ms"}
            assert summary["output_throughput"] > 0 and summary["tpot"]["mean_ms"] > 0
    assert saved is not None
    assert json.loads((tmp_path / "random.json").read_text())["summary"]["goodput"]["good_requests"] == 6
