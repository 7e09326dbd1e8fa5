"""FP8 checkpoints on the GPU, end to end: the FP8 GEMMs (activations quantized on the device) under CUDA graphs.

For each format the engine runs the tiny FP8 checkpoint three ways: the float32 run of its dequantized weights
(``exact``, no FP8 arithmetic at all), and FP8 in bf16 eagerly and on the fast path (CUDA graphs, compiled norms).
The fast path must drift from ``exact`` no more than eager does (as for bf16 models, ``gpu.
assert_decode_drift_within_eager``), and eager FP8 stays within ``FP8_DRIFT`` of ``exact``: the activations'
quantization (per token, or per token and 128 columns) adds an error of the weights' size (the CPU tests measure
0.20-0.23 mean |d logprob| for the weights' on these random models), bf16 a little more.
"""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from gpu import assert_decode_drift_within_eager, decode_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FP8_DRIFT = 0.5  # mean |d logprob| of eager FP8 (bf16) against the float32 dequantized run, positions that agree
CASES = {  # case -> (architecture, format or None for quantization="fp8", builder options, the layers' backend)
    "fine-grained": ("Qwen3ForCausalLM", "fine-grained", {}, "triton"),
    "ct-channel": ("Qwen3ForCausalLM", "ct-channel", {}, "rowwise"),
    "ct-tensor-static": ("Qwen3ForCausalLM", "ct-tensor", {"static_activations": True}, "rowwise"),
    "online": ("LlamaForCausalLM", None, {}, "rowwise"),
    "moe-fine-grained": ("Qwen3MoeForCausalLM", "fine-grained", {}, "triton"),
}


def backends(path: str, **engine_args: Any) -> tuple[str, str | None]:
    """(an attention projection's FP8 backend, the first MoE layer's experts' backend or None)."""
    from nanovllm import LLM

    llm = LLM(path, device="cuda", max_model_len=256, enforce_eager=True, **engine_args)
    try:
        layer = llm.engine.core.executor.model.model.layers[0]
        experts = getattr(layer.mlp, "experts", None)
        assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
        return layer.self_attn.qkv_proj.quant_method.backend, experts.quant_method.backend if experts else None
    finally:
        llm.shutdown()


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_decode_on_gpu(case: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from test_fp8_weights import dequantized_checkpoint

    from nanovllm.testing_fp8 import build_fp8_checkpoint, build_fp8_source

    arch, fmt, options, backend = CASES[case]
    source = build_fp8_source(tmp_path_factory.mktemp("bf16"), arch)
    engine_args: dict[str, Any] = {"quantization": "fp8"} if fmt is None else {}
    path = source if fmt is None else build_fp8_checkpoint(tmp_path_factory.mktemp(case), source, fmt, **options)
    assert backends(path, **engine_args) == (backend, "fused_fp8" if "moe" in case else None)
    exact = decode_logprobs(dequantized_checkpoint(path, tmp_path_factory.mktemp("deq"), online=fmt is None),
                            dtype="float32", enforce_eager=True)
    eager = decode_logprobs(path, enforce_eager=True, **engine_args)
    fast = decode_logprobs(path, **engine_args)
    assert_decode_drift_within_eager(exact, eager, fast)
    drifts = []
    for (tokens, reference), (eager_tokens, eager_lp) in zip(exact, eager):
        same = next((i for i, (a, b) in enumerate(zip(tokens, eager_tokens)) if a != b), len(tokens))
        drifts += [abs(a - b) for a, b in zip(eager_lp[:same], reference[:same])]
    assert len(drifts) >= 48 and sum(drifts) / len(drifts) < FP8_DRIFT, (len(drifts), sum(drifts) / len(drifts))


def test_fp8_dummy_weights_at_a_real_shape_on_gpu(tmp_path_factory: pytest.TempPathFactory) -> None:
    """quantization='fp8' with dummy weights (how the benchmarks run FP8 at real shapes) decodes under graphs."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.testing import write_config_only

    path = write_config_only(tmp_path_factory.mktemp("qwen3"), "qwen3-0.6b", num_hidden_layers=2)
    llm = LLM(path, device="cuda", load_format="dummy", quantization="fp8", max_model_len=256)
    try:
        rng = random.Random(0)
        prompts = [[rng.randrange(1000) for _ in range(rng.randint(5, 50))] for _ in range(20)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert all(len(o.token_ids) == 8 for o in outs)
    finally:
        llm.shutdown()
