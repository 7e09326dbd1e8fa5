"""Parity with Hugging Face transformers on the same tiny checkpoints: greedy tokens and prefill logits.

Logits come straight from nanovllm's model runner (``llm.engine.core.executor``): a hand-built
``SchedulerOutput`` (several prompts in one batch) goes through ``build_host_batch`` and ``to_forward_batch`` and
``ModelRunner.forward``, whose hidden states of every row go through ``model.compute_logits``, so every
position's logits are compared, in one chunk or in several (each chunk reading the paged KV the earlier ones wrote).
"""
from __future__ import annotations

import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.request import Request
from nanovllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from nanovllm.engine.batch_builder import build_host_batch
from nanovllm.executor.input_batch import to_forward_batch

CHECKPOINTS = ["qwen3_dir", "qwen3_tied_dir", "qwen2_dir"]
MAX_TOKENS = 12
LOGITS_ATOL = 1e-4  # float32 on both sides (measured max difference ~1e-5); logits have std ~2.4

_rng = random.Random(1234)
ID_PROMPTS = [[_rng.randrange(480) for _ in range(n)] for n in (1, 2, 5, 16, 17, 31, 64, 100)]
TEXT_PROMPTS = [
    "A",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
    "Every morning he went out in his boat.",
]


@pytest.fixture(scope="module", params=CHECKPOINTS)
def pair(request: pytest.FixtureRequest):
    """(nanovllm LLM, HF model) on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(request.param)
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=256, block_size=16, enforce_eager=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield llm, hf
    del llm, hf


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int, eos_token_id) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def hf_logits(hf, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt_ids])).logits[0].float()


def all_row_logits(runner, batch) -> torch.Tensor:
    """Logits of every row of a forward batch."""
    return runner.model.compute_logits(runner.forward(batch).hidden)


def our_logits(llm: LLM, prompts: list[list[int]], chunk_size: int | None = None) -> list[torch.Tensor]:
    """Logits at every position of each prompt, computed by the model runner on the paged KV pool.

    All prompts go in each forward together (a mixed batch); ``chunk_size`` cuts each into chunks of that size.
    """
    runner = llm.engine.core.executor
    kv = llm.engine.core.kv
    assert not llm.engine.has_unfinished()
    num_free = kv.allocator.num_free
    requests = [
        Request(f"logits-{i}", list(ids), SamplingParams(temperature=0), max_tokens=1, sampling_seed=0)
        for i, ids in enumerate(prompts)
    ]
    pages: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    try:
        start = 0
        longest = max(len(p) for p in prompts)
        while start < longest:
            chunks = []
            for i, request in enumerate(requests):
                if start < request.num_tokens:
                    n = request.num_tokens - start if chunk_size is None else min(chunk_size, request.num_tokens - start)
                    # as the scheduler does: the page table grows to cover the tokens computed so far
                    pages[i] += kv.allocator.allocate(kv.pages_for(start + n) - len(pages[i]))
                    request.set_page_table(list(pages[i]))
                    chunks.append(ScheduledChunk(request, start, n, sample=False))
            sched = SchedulerOutput(chunks=chunks, num_batched_tokens=sum(c.num_tokens for c in chunks))
            batch = to_forward_batch(build_host_batch(sched, runner.block_size, runner.vocab_size), runner.stager)
            with torch.inference_mode():
                logits = all_row_logits(runner, batch).float().cpu()
            offset = 0
            for chunk in chunks:
                index = requests.index(chunk.request)
                rows[index].append(logits[offset : offset + chunk.num_tokens])
                offset += chunk.num_tokens
            start += chunk_size if chunk_size is not None else longest
    finally:
        for held in pages:
            kv.allocator.decref(held)
    assert kv.allocator.num_free == num_free
    return [torch.cat(r) for r in rows]


def test_greedy_tokens_match_hf_up_to_eos(pair):
    """Default stopping on both sides: identical tokens, eos included where HF produced one."""
    llm, hf = pair
    prompts = ID_PROMPTS + TEXT_PROMPTS
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    eos = sorted(llm.engine.input_processor.eos_ids)
    assert eos, "the checkpoint has an eos token"
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        assert out.prompt_token_ids == ids
        expected = hf_greedy(hf, ids, MAX_TOKENS, eos)
        assert out.token_ids == expected, f"prompt of {len(ids)} tokens"
        assert out.finish_reason == ("stop" if expected[-1] in eos else "length")


def test_greedy_tokens_match_hf_ignore_eos(pair):
    """ignore_eos against HF generate with no eos: both produce exactly max_tokens tokens."""
    llm, hf = pair
    prompts = [ID_PROMPTS[0], ID_PROMPTS[3], ID_PROMPTS[-1], TEXT_PROMPTS[2]]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        expected = hf_greedy(hf, ids, MAX_TOKENS, eos_token_id=None)
        assert len(expected) == MAX_TOKENS
        assert out.token_ids == expected
        assert out.finish_reason == "length"


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_prefill_logits_match_hf(pair, chunk_size):
    """Logits at every prompt position, for a mixed batch of prompts of 1 to 100 tokens."""
    llm, hf = pair
    prompts = [ID_PROMPTS[i] for i in (0, 1, 4, 7)] + [llm.tokenizer.encode(TEXT_PROMPTS[3])]
    ours = our_logits(llm, prompts, chunk_size)
    for ids, logits in zip(prompts, ours):
        expected = hf_logits(hf, ids)
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=1e-4)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
