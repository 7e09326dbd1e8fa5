"""The prefix cache inside the engine: same greedy output with it on and off, exact hit accounting, eviction."""
from __future__ import annotations

import random

import pytest

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _llm(path: str, **kwargs) -> LLM:
    return LLM(path, device="cpu", dtype="float32", **kwargs)


def _workloads() -> dict[str, list[list[int]]]:
    rng = random.Random(3)
    system = [rng.randint(3, 470) for _ in range(37)]  # ends mid-page for every page size used below
    turn1 = system + [rng.randint(3, 470) for _ in range(9)]
    turn2 = turn1 + [rng.randint(3, 470) for _ in range(13)]
    return {
        "shared system prompt": [system + [rng.randint(3, 470) for _ in range(n)] for n in (1, 4, 17, 30)],
        "growing chat": [turn1, turn2, turn2 + [rng.randint(3, 470) for _ in range(20)]],
        "full repeats": [system, system, system[:16], system[:16]],
        "mid-page prefixes": [system[:n] for n in (5, 13, 20, 29)],
    }


@pytest.fixture(scope="module")
def reference(qwen3_dir: str) -> dict[str, list[list[int]]]:
    llm = _llm(qwen3_dir, enable_prefix_caching=False)
    return {name: [o.token_ids for o in llm.generate(p, GREEDY, use_tqdm=False)] for name, p in _workloads().items()}


@pytest.mark.parametrize("engine_args", [
    {},
    {"block_size": 4, "max_num_batched_tokens": 7},
    {"block_size": 3, "num_kv_blocks": 40},
    {"block_size": 5, "async_scheduling": True},
])
def test_greedy_output_unchanged_by_the_cache(qwen3_dir: str, reference: dict, engine_args: dict) -> None:
    llm = _llm(qwen3_dir, **engine_args)
    for name, prompts in _workloads().items():
        for attempt in range(2):  # the second pass hits what the first cached
            outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
            assert [o.token_ids for o in outputs] == reference[name], (name, attempt)
        cache = llm.engine.core.kv.prefix_cache
        cache.check_invariants()
        # nothing but the cache holds pages once every request is done
        assert llm.engine.core.kv.allocator.num_used == cache.num_cached_pages


def test_num_cached_tokens_is_exact(qwen3_dir: str) -> None:
    llm = _llm(qwen3_dir, block_size=4)
    prompt = list(range(10, 30))  # 20 tokens: 5 pages of 4
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    # the same prompt: everything but the last token, which must be computed for its logits; 19 = 4 full
    # pages plus 3 tokens copied from the fifth
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 19
    # a prompt sharing 10 tokens: 2 full pages, then 2 of the third page's 4 tokens copied on write
    other = prompt[:10] + [400, 401, 402]
    assert llm.generate([other], GREEDY, use_tqdm=False)[0].num_cached_tokens == 10
    assert llm.stats()["prefix_cache_hits"] == 29


def test_identical_prompts_in_one_step_share_the_first_prefill(qwen3_dir: str) -> None:
    llm = _llm(qwen3_dir, block_size=4)
    prompt = list(range(50, 90))
    outputs = llm.generate([prompt] * 6, GREEDY, use_tqdm=False)
    assert outputs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 39 for o in outputs[1:])
    assert len({tuple(o.token_ids) for o in outputs}) == 1
    # the followers were held back one step, not one step each
    assert llm.stats()["num_steps"] <= GREEDY.max_tokens + 2


def test_full_cache_under_memory_pressure_evicts_and_leaks_nothing(qwen3_dir: str) -> None:
    llm = _llm(qwen3_dir, block_size=4, num_kv_blocks=24)
    rng = random.Random(5)
    for _ in range(4):  # each round fills the pool with new prefixes, so earlier ones must be evicted
        prompts = [[rng.randint(3, 470) for _ in range(rng.randint(10, 40))] for _ in range(5)]
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert all(len(o.token_ids) == GREEDY.max_tokens for o in outputs)
    kv = llm.engine.core.kv
    kv.prefix_cache.check_invariants()
    used = kv.allocator.num_used
    assert used == kv.prefix_cache.num_cached_pages <= kv.num_pages
    assert kv.prefix_cache.reset() == used  # every page held is the cache's alone
    assert kv.allocator.num_free == kv.num_pages
