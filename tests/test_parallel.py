"""Tensor parallelism over several CPU processes (gloo): the same greedy tokens as one process, and clean failure."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.testing import build_checkpoint

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(5, 5 + n)) for n in (1, 9, 40)]

MODELS = {
    "dense-gqa": ("Qwen3ForCausalLM", {}),  # 4 heads, 2 KV heads: one KV head per rank
    "kv-heads-below-tp": ("Qwen3ForCausalLM", {"num_key_value_heads": 1}),  # the KV head is replicated
    "moe": ("Qwen3MoeForCausalLM", {"num_hidden_layers": 3, "mlp_only_layers": [1]}),  # experts sharded
    "qwen2-bias": ("Qwen2ForCausalLM", {}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory) -> str:
    arch, overrides = MODELS[request.param]
    return build_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)


def _greedy(path: str, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, device="cpu", dtype="float32", **engine_args)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)], llm


def test_tp2_matches_one_process_and_leaves_no_process(model: str) -> None:
    # (one process holds one tensor-parallel group: the single-process references come first)
    expected, single = _greedy(model)
    seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=11)
    expected_seeded = [o.token_ids for o in single.generate(PROMPTS, seeded, use_tqdm=False)]
    got, llm = _greedy(model, tensor_parallel_size=2, max_num_batched_tokens=16, async_scheduling=True)
    try:
        assert got == expected
        # seeded sampling agrees too: every rank samples, and a disagreement would corrupt the next inputs
        assert [o.token_ids for o in llm.generate(PROMPTS, seeded, use_tqdm=False)] == expected_seeded
    finally:
        llm.shutdown()
    assert not mp.active_children()


def test_bad_tensor_parallel_size_is_a_clear_error(tmp_path) -> None:
    path = build_checkpoint(tmp_path / "m", "Qwen3ForCausalLM", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises((ValueError, RuntimeError), match="divisible"):
        LLM(path, device="cpu", dtype="float32", tensor_parallel_size=3)
    assert not mp.active_children()


def test_killed_worker_raises_promptly(tmp_path) -> None:
    path = build_checkpoint(tmp_path / "m", "Qwen3ForCausalLM")
    llm = LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2)
    try:
        worker = llm.engine.core.executor.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="died"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()
    assert not mp.active_children()
