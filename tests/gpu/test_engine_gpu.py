"""The GPU fast path (Triton attention, CUDA graphs, overlap scheduling) against the torch reference backend."""
from __future__ import annotations

import random

import pytest
import torch

from gpu import assert_decode_drift_within_eager, decode_logprobs
from nanovllm import LLM, SamplingParams
from nanovllm.testing import ARCHITECTURES, build_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory) -> str:
    # head_dim 64 and GQA 2, the shapes the Triton kernels are built for
    return build_checkpoint(
        tmp_path_factory.mktemp("gpu_qwen3"), "Qwen3ForCausalLM", hidden_size=256, intermediate_size=512,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    )


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randint(3, 470) for _ in range(40)]
    prompts = [[rng.randint(3, 470) for _ in range(n)] for n in (1, 15, 16, 17, 63, 200)]
    return prompts + [shared + [rng.randint(3, 470) for _ in range(n)] for n in (3, 30)] + [shared]


def _generate(model: str, device: str = "cuda", **engine_args) -> list[list[int]]:
    llm = LLM(model, device=device, max_model_len=512, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    first = [o.token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
    second = [o.token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]  # prefix-cache hits
    assert first == second
    assert llm.engine.core.kv.allocator.num_used == llm.engine.core.kv.prefix_cache.num_cached_pages
    return first


def test_fp32_triton_graphs_overlap_match_torch_backend(gpu_model_dir: str) -> None:
    reference = _generate(gpu_model_dir, dtype="float32", attention_backend="torch", enforce_eager=True,
                          async_scheduling=False)
    fast = _generate(gpu_model_dir, dtype="float32", attention_backend="triton")
    assert fast == reference
    chunked = _generate(gpu_model_dir, dtype="float32", attention_backend="triton", max_num_batched_tokens=24,
                        block_size=32)
    assert chunked == reference
    # a budget of 4 tokens: steps of decode rows plus one token of a prompt that does not sample yet
    assert _generate(gpu_model_dir, dtype="float32", attention_backend="triton", max_num_batched_tokens=4) == reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_family_on_the_fast_path_matches_the_cpu_engine(arch: str, tmp_path) -> None:
    """Each model family (Llama with llama3 scaling; both MoE families through the fused MoE kernel; QK-norm and
    rotary through their fused kernel) on the GPU path, against the plain torch path on the CPU, in float32."""
    extra = {"rope_scaling": "llama3"} if arch == "LlamaForCausalLM" else {}
    model = build_checkpoint(
        tmp_path / arch, arch, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, **({} if "Qwen2" in arch else {"head_dim": 64}), **extra,
    )
    reference = _generate(model, device="cpu", dtype="float32")
    assert _generate(model, dtype="float32") == reference
    assert _generate(model, dtype="float32", max_num_batched_tokens=24, block_size=32) == reference


def _prompt_logprobs(model: str, dtype: str, backend: str) -> torch.Tensor:
    """Logprob of every prompt token under the model, for the test prompts, as one flat tensor."""
    llm = LLM(model, device="cuda", dtype=dtype, attention_backend=backend, max_model_len=512,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(_prompts(), params, use_tqdm=False)
    return torch.tensor([next(iter(entry.values())) for o in outputs for entry in o.prompt_logprobs[1:]])


def test_bf16_logprobs_as_close_to_float32_as_the_torch_backend(gpu_model_dir: str) -> None:
    """In bf16 both backends drift from the float32 answer; the Triton kernels may not drift much further."""
    exact = _prompt_logprobs(gpu_model_dir, "float32", "torch")
    torch_error = (_prompt_logprobs(gpu_model_dir, "bfloat16", "torch") - exact).abs().mean()
    triton_error = (_prompt_logprobs(gpu_model_dir, "bfloat16", "triton") - exact).abs().mean()
    assert triton_error < 1.5 * torch_error + 1e-3, (triton_error, torch_error)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_decode_graphs_as_close_to_float32_as_the_eager_path(arch: str, tmp_path) -> None:
    """bf16 decode steps on the fast path (CUDA graphs, split-K o/down projections summed in the norm, the sampling
    kernel) drift from float32 no more than eager bf16 steps (cuBLAS, no graphs) do, for every family; 48
    sequences decode at once, a batch the split-K plan splits."""
    model = build_checkpoint(
        tmp_path / arch, arch, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, **({} if "Qwen2" in arch else {"head_dim": 64}),
    )
    exact = decode_logprobs(model, dtype="float32", enforce_eager=True)
    eager = decode_logprobs(model, dtype="bfloat16", enforce_eager=True)
    assert_decode_drift_within_eager(exact, eager, decode_logprobs(model, dtype="bfloat16"))


def test_dummy_qwen3_0_6b_generates(tmp_path) -> None:
    from nanovllm.testing import write_config_only

    model = write_config_only(tmp_path / "qwen3-0.6b", "qwen3-0.6b")
    llm = LLM(model, load_format="dummy", max_model_len=1024)
    outputs = llm.generate([[1, 2, 3] * 30] * 4, SamplingParams(temperature=0.6, max_tokens=64, ignore_eos=True),
                           use_tqdm=False)
    assert [len(o.token_ids) for o in outputs] == [64] * 4
