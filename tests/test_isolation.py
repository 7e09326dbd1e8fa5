"""One request's fault fails that request alone: the others finish with the tokens they would have had, no page or
request is left behind, and the engine (in process, or in its own process) keeps serving."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.async_llm import AsyncLLM

PROMPTS = [list(range(5, 5 + n)) for n in (3, 9, 20)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


class ExplodingFloat(float):
    """Passes every range check, then breaks the step's sampling arrays (as a value that should never have got
    past validation would)."""

    def __float__(self) -> float:
        raise RuntimeError("boom: a value no array can hold")


class ExplodingStops(list):
    """A stop-token list whose lookup fails when the engine checks a sampled token (after the step ran)."""

    def __contains__(self, item: object) -> bool:
        raise RuntimeError("boom: stop check")


def exploding_sampling(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, min_p=ExplodingFloat(0.0))


def exploding_update(params: SamplingParams) -> SamplingParams:
    bad = dataclasses.replace(params)
    bad.stop_token_ids = ExplodingStops()
    return bad


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "overlap"])
def llm(qwen3_dir: str, request: pytest.FixtureRequest) -> Iterator[LLM]:
    yield LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128,
              enable_prefix_caching=False, async_scheduling=request.param)


@pytest.mark.parametrize("make_bad", [exploding_sampling, exploding_update], ids=["build", "update"])
def test_a_failing_request_fails_alone(llm: LLM, make_bad) -> None:  # noqa: ANN001
    expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    params = [GREEDY, make_bad(GREEDY), GREEDY]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert outs[1].finish_reason == "error" and "boom" in str(outs[1].outputs[0].stop_reason)
    assert [outs[0].token_ids, outs[2].token_ids] == [expected[0], expected[2]]
    assert all(o.finish_reason == "length" for o in (outs[0], outs[2]))
    core = llm.engine.core
    assert not core.scheduler.requests and core.kv.allocator.num_used == 0  # nothing left behind
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected  # and still serving


def test_a_failing_sample_ends_its_request_and_aborts_its_siblings(llm: LLM) -> None:
    bad = dataclasses.replace(exploding_update(GREEDY), n=3)
    bad.stop_token_ids = ExplodingStops()
    out = llm.generate([PROMPTS[0]], bad, use_tqdm=False)[0]
    assert [c.finish_reason for c in out.outputs] == ["error"] * 3
    assert not llm.engine.core.scheduler.requests and llm.engine.core.kv.allocator.num_used == 0


def test_the_core_process_survives_a_request_it_cannot_take(qwen3_dir: str) -> None:
    """A spec that cannot even become a request (here: built by hand, with no prompt) is refused by the core
    process alone; the engine stays healthy and serves the next request."""
    engine = AsyncLLM.from_engine_args(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128)
    try:
        async def main() -> list[int]:
            good = engine.input_processor.process("good", PROMPTS[0], GREEDY)
            broken = dataclasses.replace(good.engine_requests[0], request_id="broken", prompt_token_ids=None)
            engine.core.add_requests((broken,))
            outputs = [out async for out in engine.generate(PROMPTS[0], GREEDY, stream=False)]
            return outputs[-1].outputs[0].token_ids

        tokens = asyncio.run(asyncio.wait_for(main(), 120))
        assert len(tokens) == GREEDY.max_tokens and engine.is_healthy
    finally:
        engine.shutdown()
