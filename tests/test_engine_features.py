"""Engine features leave greedy output unchanged: chunked prefill, max_num_seqs, preemption, odd page sizes, n > 1.

Plus the shape of the outputs (order, text, token ids, finish reasons) and dummy weights from a config alone.
"""
from __future__ import annotations

import random
from typing import Any

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.testing import tiny_config_dict, write_config_only

_rng = random.Random(99)
PROMPTS: list[Any] = [[_rng.randrange(480) for _ in range(n)] for n in (1, 3, 9, 17, 26, 40)] + [
    "Hello, world!",
    "The meeting starts at 9:30 a.m. on Monday, March 3rd, 2025, in room 101.",
]
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_llm(path: str, **kwargs: Any) -> LLM:
    kwargs.setdefault("num_kv_blocks", 256)
    return LLM(path, device="cpu", dtype="float32", **kwargs)


def token_ids(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def spy_schedule(llm: LLM) -> list[list[tuple[int, int, bool]]]:
    """Record every step's chunks as (start, num_tokens, was a decode) on this engine's scheduler."""
    scheduler = llm.engine.core.scheduler
    schedule = scheduler.schedule
    steps: list[list[tuple[int, int, bool]]] = []

    def spy():
        out = schedule()
        steps.append(
            [(c.start, c.num_tokens, c.start >= c.request.num_prompt_tokens) for c in out.chunks]
        )
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
        return out

    scheduler.schedule = spy
    return steps


def assert_all_pages_free(llm: LLM) -> None:
    """No request holds a page; with the prefix cache on, the cache may keep (unlocked) pages for later hits."""
    core = llm.engine.core
    assert not core.has_unfinished()
    cache = core.kv.prefix_cache
    if cache is None:
        assert core.kv.allocator.num_free == core.kv.num_pages
    else:
        assert core.kv.allocator.num_free + cache.num_cached_pages == core.kv.num_pages
        assert cache.num_evictable_pages == cache.num_cached_pages, "no cached page is still locked"


@pytest.fixture(scope="module")
def baseline(qwen3_dir) -> list[list[int]]:
    llm = make_llm(qwen3_dir)
    outs = token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert all(len(t) == MAX_TOKENS for t in outs)
    return outs


@pytest.fixture(scope="module")
def llm(qwen3_dir) -> LLM:
    return make_llm(qwen3_dir)


@pytest.mark.parametrize("budget", [3, 7])
def test_tiny_token_budget(qwen3_dir, baseline, budget):
    """Prompts are cut into chunks of at most ``budget`` tokens and ride with decodes in mixed batches."""
    llm = make_llm(qwen3_dir, max_num_batched_tokens=budget)
    steps = spy_schedule(llm)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == baseline
    assert all(sum(n for _, n, _ in step) <= budget for step in steps)
    assert any(start > 0 and start < 40 and not decode for step in steps for start, _, decode in step), "chunked"
    assert any(
        any(decode for *_, decode in step) and any(not decode for *_, decode in step) for step in steps
    ), "some step mixes decodes and prefill chunks"
    assert_all_pages_free(llm)


def test_max_num_seqs_one(qwen3_dir, baseline):
    llm = make_llm(qwen3_dir, max_num_seqs=1)
    steps = spy_schedule(llm)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == baseline
    assert max(len(step) for step in steps) == 1
    assert_all_pages_free(llm)


def largest_request_pages(llm: LLM, block_size: int) -> int:
    lengths = [len(llm.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in PROMPTS]
    return -(-(max(lengths) + MAX_TOKENS) // block_size)


def test_preemption_keeps_greedy_output_and_frees_every_page(qwen3_dir, llm, baseline):
    """A pool that holds just the largest request: the others preempt each other."""
    pages = largest_request_pages(llm, 4)
    small = make_llm(qwen3_dir, block_size=4, num_kv_blocks=pages, enable_prefix_caching=False)
    assert token_ids(small.generate(PROMPTS, GREEDY, use_tqdm=False)) == baseline
    assert small.engine.core.scheduler.num_preemptions > 0
    assert small.engine.core.stats.num_preemptions == small.engine.core.scheduler.num_preemptions
    assert small.engine.core.kv.prefix_cache is None
    assert small.engine.core.kv.allocator.num_free == small.engine.core.kv.num_pages
    assert_all_pages_free(small)
    # and the engine is fine for another round
    assert token_ids(small.generate(PROMPTS[:3], GREEDY, use_tqdm=False)) == baseline[:3]
    assert_all_pages_free(small)


def test_preemption_with_tiny_budget_and_prefix_caching(qwen3_dir, llm, baseline):
    """Everything at once: chunks of 5 tokens, preemption, the default prefix caching."""
    pages = largest_request_pages(llm, 4) + 1
    small = make_llm(qwen3_dir, block_size=4, num_kv_blocks=pages, max_num_batched_tokens=5)
    assert token_ids(small.generate(PROMPTS, GREEDY, use_tqdm=False)) == baseline
    assert small.engine.core.scheduler.num_preemptions > 0
    assert_all_pages_free(small)


@pytest.mark.parametrize("extra", [{}, {"max_num_batched_tokens": 5, "block_size": 4, "num_kv_blocks": "tight"}])
def test_overlap_scheduling(qwen3_dir, llm, baseline, extra):
    """async_scheduling: step N+1 is scheduled before step N's tokens are read back; same greedy tokens."""
    kwargs = dict(extra)
    if kwargs.get("num_kv_blocks") == "tight":
        kwargs.update(num_kv_blocks=largest_request_pages(llm, 4) + 1, enable_prefix_caching=False)
    overlapped = make_llm(qwen3_dir, async_scheduling=True, **kwargs)
    assert overlapped.engine.core.overlap
    assert token_ids(overlapped.generate(PROMPTS, GREEDY, use_tqdm=False)) == baseline
    # stopping one step late must not leak a token: stop tokens, eos and max_tokens end where they should
    stop_token = baseline[4][5]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_token])
    out = overlapped.generate(PROMPTS[4], params, use_tqdm=False)[0]
    assert out.token_ids == baseline[4][: baseline[4].index(stop_token) + 1] and out.finish_reason == "stop"
    short = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    assert token_ids(overlapped.generate(PROMPTS, short, use_tqdm=False)) == [t[:1] for t in baseline]
    if "num_kv_blocks" in kwargs:
        assert overlapped.engine.core.scheduler.num_preemptions > 0
        assert_all_pages_free(overlapped)
    assert not overlapped.engine.core.has_unfinished()


@pytest.mark.parametrize("block_size", [1, 3, 5, 7])
def test_odd_block_sizes(qwen3_dir, baseline, block_size):
    llm = make_llm(qwen3_dir, block_size=block_size, num_kv_blocks=512)
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == baseline
    # again: now prompts hit the prefix cache (whole pages, and copy-on-write partial pages)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outs) == baseline
    assert sum(o.num_cached_tokens for o in outs) > 0
    assert_all_pages_free(llm)


def test_n_greedy_samples_are_identical(llm, baseline):
    params = SamplingParams(n=3, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS[2:5], params, use_tqdm=False)
    for out, expected in zip(outs, baseline[2:5]):
        assert len(out.outputs) == 3
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == expected for c in out.outputs)
        assert all(c.finish_reason == "length" for c in out.outputs)
    assert_all_pages_free(llm)


def test_outputs_in_input_order_with_text_and_token_ids(llm, baseline):
    order = [5, 0, 7, 2, 6, 1]
    prompts = [PROMPTS[i] for i in order]
    # different lengths so requests finish out of input order
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS - i, ignore_eos=True) for i in range(len(order))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == len(prompts)
    for out, i, p, prompt in zip(outs, order, params, prompts):
        assert out.token_ids == baseline[i][: p.max_tokens]
        assert out["token_ids"] == out.token_ids == out.outputs[0].token_ids
        assert out["text"] == out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out["finish_reason"] == out.finish_reason == "length"
        assert out.finished
        if isinstance(prompt, str):
            assert out.prompt == prompt
            assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        else:
            assert out.prompt_token_ids == prompt
    assert len({o.request_id for o in outs}) == len(outs)


def test_single_prompt_forms(llm, baseline):
    """One prompt, as token ids or as text, without a list around it."""
    outs = llm.generate(PROMPTS[3], GREEDY, use_tqdm=False)
    assert len(outs) == 1 and outs[0].token_ids == baseline[3]
    outs = llm.generate(PROMPTS[6], GREEDY, use_tqdm=False)
    assert len(outs) == 1 and outs[0].token_ids == baseline[6]


def test_finish_reason_stop_on_a_stop_token(llm, baseline):
    stop_token = baseline[4][5]
    first = baseline[4].index(stop_token)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_token])
    out = llm.generate(PROMPTS[4], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_token
    assert out.token_ids == baseline[4][: first + 1]


def test_finish_reason_stop_on_eos(llm):
    """Find one-token prompts whose greedy next token is eos, then check they stop there."""
    eos = sorted(llm.engine.input_processor.eos_ids)
    assert eos
    probe = llm.generate([[t] for t in range(480)], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    hits = [i for i, out in enumerate(probe) if out.token_ids[0] in eos]
    assert hits, "no one-token prompt of this checkpoint is followed by eos"
    for out in (probe[i] for i in hits):
        assert out.finish_reason == "stop" and out.outputs[0].stop_reason is None
    prompt = [hits[0]]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 1 and out.token_ids[0] in eos
    assert out.text == ""  # eos is a special token: skipped in the text
    # ignore_eos runs on to max_tokens
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4 and out.token_ids[0] in eos
    # min_tokens masks eos until that many tokens are out
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=3), use_tqdm=False)[0]
    assert len(out.token_ids) >= 3 and not set(out.token_ids[:3]) & set(eos)
    assert_all_pages_free(llm)


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory) -> str:
    return write_config_only(tmp_path_factory.mktemp("config_only"), tiny_config_dict("Qwen3ForCausalLM"))


def test_dummy_weights_from_a_config_only_directory(config_only_dir):
    llm = LLM(config_only_dir, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64)
    prompts = [[1, 2, 3], list(range(10, 40))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [6, 6]
    assert all(0 <= t < 512 for o in outs for t in o.token_ids)
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts
    # dummy weights are drawn from the engine seed: a second engine gives the same tokens
    again = LLM(config_only_dir, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64)
    assert token_ids(again.generate(prompts, params, use_tqdm=False)) == token_ids(outs)
    assert_all_pages_free(llm)


def test_config_only_directory_has_no_tokenizer(config_only_dir):
    """No tokenizer files: the engine has no tokenizer, text prompts say so, and eos comes from the config only.

    (transformers 5 builds an empty ``Qwen2Tokenizer`` from a config-only directory instead of raising: an engine
    that keeps it encodes text to no tokens and takes that tokenizer's eos, id 0, as a stop token.)
    """
    llm = LLM(config_only_dir, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64)
    assert llm.tokenizer is None
    assert llm.engine.input_processor.eos_ids == frozenset({477})
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)
    assert_all_pages_free(llm)
