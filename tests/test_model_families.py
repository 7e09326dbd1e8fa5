"""Llama 2/3.x, Qwen2-MoE and Qwen3-MoE against Hugging Face transformers on tiny random checkpoints (float32, CPU)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.testing import build_checkpoint

VARIANTS = {
    "llama2-no-gqa": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaForCausalLM", dict(num_key_value_heads=2)),
    # original_max_position_embeddings is 256 here: the prompts below run past it, where the scaling matters
    "llama3-rope-scaling": ("LlamaForCausalLM", dict(rope_scaling="llama3", rope_theta=500000.0)),
    "llama-biases": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    # 8 experts, top-3, one of three layers dense
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen3-moe-sparse-step": ("Qwen3MoeForCausalLM", dict(num_hidden_layers=3, decoder_sparse_step=2)),
    "qwen2-moe-shared-expert": ("Qwen2MoeForCausalLM", dict(num_hidden_layers=3, mlp_only_layers=[0])),
}
PROMPT_LENGTHS = (1, 37, 270)
MAX_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def family(request, tmp_path_factory) -> tuple[str, str]:
    arch, overrides = VARIANTS[request.param]
    return request.param, build_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)


def _hf_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outputs = []
    for prompt in prompts:
        # eos_token_id=None: run to MAX_TOKENS without banning EOS, which is what ignore_eos does
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def _prompts() -> list[list[int]]:
    return [[(7 * i + 3) % 470 + 3 for i in range(n)] for n in PROMPT_LENGTHS]


def test_greedy_matches_hf_and_survives_chunking_and_preemption(family: tuple[str, str]) -> None:
    name, path = family
    expected = _hf_greedy(path, _prompts())
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for engine_args in ({}, {"max_num_batched_tokens": 7}, {"num_kv_blocks": 20, "block_size": 16}):
        llm = LLM(path, device="cpu", dtype="float32", **engine_args)
        got = [o.token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
        assert got == expected, (name, engine_args)
        if "num_kv_blocks" in engine_args:
            assert llm.engine.core.scheduler.num_preemptions > 0


def test_prompt_logprobs_match_hf_logits(family: tuple[str, str]) -> None:
    _, path = family
    prompt = _prompts()[2]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    llm = LLM(path, device="cpu", dtype="float32")
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    got = torch.tensor([entry[token] for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
