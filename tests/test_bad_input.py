"""Bad input is a ``ValueError`` that names the field, raised before anything is queued; the engine stays usable."""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from nanovllm import LLM, SamplingParams

MAX_MODEL_LEN = 64
BLOCK_SIZE = 4
NUM_KV_BLOCKS = 12  # 48 tokens: less than max_model_len, so "does not fit the pool" is its own case


@pytest.fixture(scope="module")
def llm(qwen3_dir) -> LLM:
    return LLM(
        qwen3_dir, device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_KV_BLOCKS,
    )


@pytest.fixture(scope="module")
def expected(llm) -> list[int]:
    return llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].token_ids


@contextlib.contextmanager
def launch_fails_on_call(llm: LLM, failing_call: int) -> Iterator[None]:
    """The executor's ``launch`` raises "device lost" on its ``failing_call``-th call while the block runs."""
    executor = llm.engine.core.executor
    real = executor.launch
    calls = 0

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    executor.launch = failing
    try:
        yield
    finally:
        executor.launch = real


def assert_idle(llm: LLM, drained: bool = True) -> None:
    """No request and no page left behind (and, with ``drained``, no step still in flight either)."""
    engine = llm.engine
    if drained:
        assert not engine.has_unfinished()
    assert not engine.core.scheduler.requests
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting
    assert not engine.output_processor.states
    kv = engine.core.kv
    if kv.prefix_cache is None:
        assert kv.allocator.num_free == kv.num_pages
    else:  # the cache may keep unlocked pages for later hits; no request holds any
        assert kv.allocator.num_free + kv.prefix_cache.num_cached_pages == kv.num_pages
        assert kv.prefix_cache.num_evictable_pages == kv.prefix_cache.num_cached_pages


def assert_rejected(llm: LLM, expected: list[int], prompts: Any, params: Any, match: str) -> None:
    """The call raises a ValueError matching ``match``, leaves the engine idle, and a valid call still works."""
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)
    assert_idle(llm)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert out[0].token_ids == expected
    assert_idle(llm)


GREEDY = SamplingParams(temperature=0, max_tokens=4)


# ---- prompts ---------------------------------------------------------------------------------------------------


def test_prompt_plus_max_tokens_longer_than_max_model_len(llm, expected):
    prompt = list(range(1, MAX_MODEL_LEN - 5))
    assert_rejected(llm, expected, [prompt], SamplingParams(max_tokens=10), match="max_model_len")
    # max_tokens=None: up to max_model_len, which a full-length prompt leaves no room for
    assert_rejected(llm, expected, [list(range(1, MAX_MODEL_LEN + 1))], SamplingParams(max_tokens=None),
                    match="max_model_len")


def test_empty_prompts(llm, expected):
    assert_rejected(llm, expected, "", GREEDY, match="prompt")
    assert_rejected(llm, expected, [""], GREEDY, match="prompt")
    assert_rejected(llm, expected, [[]], GREEDY, match="prompt")
    assert_rejected(llm, expected, [[1, 2], []], GREEDY, match="prompt")


def test_empty_prompt_list_is_no_prompts(llm):
    """``generate([])`` is an empty batch (as in vLLM), not an empty prompt."""
    assert llm.generate([], GREEDY, use_tqdm=False) == []
    assert_idle(llm)


@pytest.mark.parametrize("bad", [[512], [1, 2, 100000], [-1], [3, -5, 4]])
def test_token_ids_outside_the_vocabulary(llm, expected, bad):
    assert_rejected(llm, expected, [bad], GREEDY, match="token ids")


@pytest.mark.parametrize("bad", [[1.5, 2], ["a", "b"], [True, 2], [[1, 2]]])
def test_prompts_of_the_wrong_type(llm, expected, bad):
    assert_rejected(llm, expected, [bad], GREEDY, match="prompt")


def test_prompt_that_cannot_fit_the_kv_pool(llm, expected):
    pool_tokens = NUM_KV_BLOCKS * BLOCK_SIZE
    prompt = list(range(1, pool_tokens - 1))  # fits max_model_len, not the pool with its max_tokens
    assert len(prompt) + 8 <= MAX_MODEL_LEN
    assert_rejected(llm, expected, [prompt], SamplingParams(max_tokens=8), match="KV")
    # n > 1 of a request that fits: fine, the samples take turns
    out = llm.generate([prompt[:30]], SamplingParams(n=2, temperature=0, max_tokens=8), use_tqdm=False)
    assert [len(c.token_ids) for c in out[0].outputs] == [8, 8]
    assert_idle(llm)


def test_one_bad_prompt_rejects_the_whole_batch(llm, expected):
    prompts = [[1, 2, 3], [4, 5], [600]]
    assert_rejected(llm, expected, prompts, GREEDY, match="token ids")
    params = [GREEDY, GREEDY, SamplingParams(stop_token_ids=[100000])]
    assert_rejected(llm, expected, [[1, 2, 3]] * 3, params, match="stop_token_ids")


def test_sampling_params_count_must_match(llm, expected):
    assert_rejected(llm, expected, [[1], [2], [3]], [GREEDY, GREEDY], match="sampling_params")


def test_stop_token_ids_outside_the_vocabulary(llm, expected):
    assert_rejected(llm, expected, [[1, 2]], SamplingParams(stop_token_ids=[512]), match="stop_token_ids")


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_error_mid_generation_leaves_nothing_behind(qwen3_dir, overlap):
    """A failure inside a step (here: the executor raises on its third step) aborts every request of the call."""
    llm = LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=64, async_scheduling=overlap)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with launch_fails_on_call(llm, 3), pytest.raises(RuntimeError, match="device lost"):
        llm.generate(prompts, params, use_tqdm=False)
    assert_idle(llm, drained=False)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert_idle(llm)


def test_engine_error_with_overlap_leaves_no_step_in_flight(qwen3_dir):
    """With overlap, the step launched before the failing one is still in flight; once generate() has raised,
    the engine should be idle (has_unfinished() False), not owe a step of aborted requests."""
    llm = LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=64, async_scheduling=True)
    with launch_fails_on_call(llm, 3), pytest.raises(RuntimeError, match="device lost"):
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert_idle(llm, drained=False)
    assert not llm.engine.has_unfinished(), "a step of aborted requests is still in flight"


# ---- sampling params -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_sampling_params_edge_values():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1)
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(stop="x").stop_strings == ["x"]


# ---- engine arguments and models -------------------------------------------------------------------------------


def test_unknown_engine_argument(qwen3_dir):
    with pytest.raises(ValueError, match="foo"):
        LLM(qwen3_dir, foo=1)
    with pytest.raises(ValueError, match="max_num_batched_token"):
        LLM(qwen3_dir, max_num_batched_token=8)  # a typo is not silently ignored


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"load_format": "pickle"}, "load_format"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_model_len": 4096}, "max_model_len"),  # larger than the checkpoint's 1024 positions
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ],
)
def test_invalid_engine_arguments(qwen3_dir, kwargs, field):
    with pytest.raises(ValueError, match=field):
        LLM(qwen3_dir, **{"device": "cpu", "dtype": "float32", **kwargs})


def test_unsupported_architecture(qwen3_dir, tmp_path):
    path = tmp_path / "foo"
    shutil.copytree(qwen3_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FooForCausalLM") as info:
        LLM(str(path), device="cpu", dtype="float32")
    assert "Qwen3ForCausalLM" in str(info.value) and "Qwen2ForCausalLM" in str(info.value)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        LLM(str(path), device="cpu", dtype="float32", load_format="dummy")
