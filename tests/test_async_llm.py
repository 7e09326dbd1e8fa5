"""AsyncLLM: streaming, abort, cancellation, the engine core in a child process, its death and its shutdown.

Every wait is bounded by ``startup_limit_s`` (generous, and longer on a loaded machine), never by a fixed few
seconds."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from server_helpers import startup_limit_s

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine.async_llm import AsyncLLM, EngineDeadError, EngineStartupError
from nanovllm.engine.serving_stats import IterationStats
from nanovllm.outputs import RequestOutput

ENGINE_ARGS = dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def run(coro):  # noqa: ANN001, ANN201 - every test's async part, bounded
    return asyncio.run(asyncio.wait_for(coro, startup_limit_s()))


def start_engine(model: str) -> AsyncLLM:
    """An ``AsyncLLM`` whose engine core must be ready within a generous limit (by default it waits for ever)."""
    return AsyncLLM(EngineConfig.from_kwargs(model, **ENGINE_ARGS), startup_timeout_s=startup_limit_s())


@pytest.fixture(scope="module")
def engine(qwen3_dir: str) -> Iterator[AsyncLLM]:
    llm = start_engine(qwen3_dir)
    try:
        yield llm
    finally:
        llm.shutdown()


async def collect(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str | None = None,  # noqa: ANN001
                  stream: bool = True) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, request_id, stream=stream)]


async def wait_idle(engine: AsyncLLM):  # noqa: ANN201
    """The core's stats once nothing runs and no page is held (aborts are asynchronous), or after a generous
    limit as they are."""
    deadline = time.monotonic() + startup_limit_s()
    while True:
        stats = await engine.get_core_stats()
        if (stats.num_running, stats.num_waiting, stats.num_used_pages) == (0, 0, 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


def test_streams_deltas_that_add_up_to_the_offline_result(engine: AsyncLLM, qwen3_dir: str) -> None:
    prompt = "Once upon a time"
    deltas = run(collect(engine, prompt, GREEDY))
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    assert len(deltas) >= 2  # streamed, not only the final output
    token_ids = [t for d in deltas for t in d.outputs[0].token_ids]
    text = "".join(d.outputs[0].text for d in deltas)
    assert len(token_ids) == 12 and deltas[-1].outputs[0].finish_reason == "length"
    (final,) = run(collect(engine, prompt, GREEDY, stream=False))
    assert final.outputs[0].token_ids == token_ids and final.outputs[0].text == text
    offline = LLM(qwen3_dir, **ENGINE_ARGS).generate([prompt], GREEDY, use_tqdm=False)[0]
    assert offline.token_ids == token_ids  # one engine, two front ends


def test_n_samples_and_concurrent_requests(engine: AsyncLLM) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6, n=3, seed=7, ignore_eos=True)

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, [1, 2, 3, i], params) for i in range(4)))

    for deltas in run(main()):
        per_index: dict[int, list[int]] = {}
        for d in deltas:
            for c in d.outputs:
                per_index.setdefault(c.index, []).extend(c.token_ids)
        assert sorted(per_index) == [0, 1, 2] and all(len(v) == 6 for v in per_index.values())
    assert run(wait_idle(engine)).num_used_pages == 0


def test_bad_requests_raise_before_anything_is_queued(engine: AsyncLLM) -> None:
    async def main() -> None:
        for prompt, params in (("", GREEDY), ([10**6], GREEDY), ("hi", SamplingParams(max_tokens=1000))):
            with pytest.raises(ValueError):
                await engine.add_request(None, prompt, params)
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=21)

    run(main())
    assert engine.num_unfinished_requests == 0 and not engine.output_processor.states


def test_abort_frees_pages(engine: AsyncLLM) -> None:
    async def main() -> list[RequestOutput]:
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        outputs = []
        async for out in engine.generate("Hello", long, "to-abort"):
            outputs.append(out)
            if len(outputs) == 2:
                await engine.abort("to-abort")
        return outputs

    outputs = run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    stats = run(wait_idle(engine))
    assert (stats.num_running, stats.num_waiting, stats.num_used_pages) == (0, 0, 0)


def test_cancelling_the_consumer_aborts(engine: AsyncLLM) -> None:
    async def main() -> None:
        started = [asyncio.Event() for _ in range(8)]

        async def consume(i: int) -> None:
            async for _ in engine.generate(f"prompt {i}", SamplingParams(max_tokens=200, ignore_eos=True)):
                started[i].set()

        tasks = [asyncio.create_task(consume(i)) for i in range(8)]
        # every request is running (a consumer cancelled before its request was queued would have nothing to abort)
        await asyncio.gather(*(event.wait() for event in started))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert engine.num_unfinished_requests == 0

        async for _ in engine.generate("break early", SamplingParams(max_tokens=200, ignore_eos=True)):
            break  # closing the generator aborts too

    run(main())
    stats = run(wait_idle(engine))
    assert (stats.num_running, stats.num_waiting, stats.num_used_pages) == (0, 0, 0)
    assert engine.stats.finished["abort"] >= 9


def test_stop_string_found_in_the_front_end(engine: AsyncLLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = "".join(d.outputs[0].text for d in run(collect(engine, "The weather", params)))
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("the tiny model's greedy text has no usable stop string")
    deltas = run(collect(engine, "The weather", SamplingParams(temperature=0.0, max_tokens=24, stop=stop,
                                                              ignore_eos=True)))
    streamed = "".join(d.outputs[0].text for d in deltas)
    assert deltas[-1].outputs[0].finish_reason == "stop" and deltas[-1].outputs[0].stop_reason == stop
    assert streamed == text[: text.index(stop)]
    assert run(wait_idle(engine)).num_used_pages == 0


class _Recorder:
    def __init__(self) -> None:
        self.items: list[IterationStats] = []

    def record(self, stats: IterationStats) -> None:
        self.items.append(stats)


def test_stats_and_request_timings(engine: AsyncLLM) -> None:
    recorder = _Recorder()
    engine.stats.add_observer(recorder)
    try:
        outputs = run(collect(engine, "stats", GREEDY))
    finally:
        engine.stats.observers.remove(recorder)
    stats = run(engine.get_core_stats())
    assert stats.num_kv_pages == 64 and stats.num_generated_tokens >= 12 and stats.num_prompt_tokens > 0
    items = recorder.items
    num_prompt = len(outputs[0].prompt_token_ids)
    assert sum(len(i.time_to_first_tokens) for i in items) == 1
    assert sum(len(i.inter_token_latencies) for i in items) == 11
    assert sum(i.num_generation_tokens for i in items) == 12 and sum(i.num_prompt_tokens for i in items) == num_prompt
    (done,) = [f for i in items for f in i.finished_requests]
    assert (done.finish_reason, done.num_prompt_tokens, done.num_generation_tokens) == ("length", num_prompt, 12)
    # the phases follow each other on the core's clock: queue, prefill, decode; inference is prefill + decode
    assert min(done.queued_time, done.prefill_time, done.decode_time) >= 0
    assert done.inference_time == pytest.approx(done.prefill_time + done.decode_time)
    assert done.mean_time_per_output_token == pytest.approx(done.decode_time / 11)
    assert sum(t for i in items for t in i.inter_token_latencies) == pytest.approx(done.decode_time)
    assert done.e2e_latency >= done.inference_time


def test_engine_death_fails_requests_and_health(qwen3_dir: str) -> None:
    engine = start_engine(qwen3_dir)
    try:
        assert engine.is_healthy
        child = psutil.Process(engine.core.pid)

        async def main() -> None:
            got_one = False
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("die", SamplingParams(max_tokens=200, ignore_eos=True)):
                    if not got_one:
                        got_one = True
                        os.kill(child.pid, signal.SIGKILL)
            assert got_one
            assert not engine.is_healthy
            with pytest.raises(EngineDeadError):
                await engine.check_health()
            with pytest.raises(EngineDeadError):
                await collect(engine, "after", GREEDY)

        run(main())
    finally:
        engine.shutdown()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_startup_error_carries_the_child_message(qwen3_dir: str, tmp_path: Path) -> None:
    broken = tmp_path / "no-weights"
    shutil.copytree(qwen3_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()  # config and tokenizer load in the front end; the weights fail in the child
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(EngineStartupError, match=r"no weights in .*no \.safetensors"):
        start_engine(str(broken))
    _, alive = psutil.wait_procs(
        [p for p in psutil.Process().children(recursive=True) if p.pid not in before and "spawn_main" in
         " ".join(p.cmdline())], timeout=startup_limit_s())
    assert not alive


def test_shutdown_leaves_no_child(qwen3_dir: str) -> None:
    engine = start_engine(qwen3_dir)
    child = psutil.Process(engine.core.pid)
    assert run(collect(engine, "bye", GREEDY))[-1].finished
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    with pytest.raises(EngineDeadError):
        run(collect(engine, "after", GREEDY))
