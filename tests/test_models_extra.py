"""Llama and MoE checkpoints as the hub writes them, and the expert sharding, against Hugging Face (float32, CPU).

``test_model_families.py`` covers the families on configs as ``build_checkpoint`` saves them (transformers 5
spelling). This module covers what hub checkpoints of other vintages look like: the older ``rope_scaling`` +
``rope_theta`` spelling of Llama 3.1, a config with no ``num_key_value_heads`` (no GQA), an MoE config naming the
expert count ``num_local_experts`` only, and routing settings the families test leaves at their defaults. It also
checks that tensor-parallel shards of the experts add up to the whole, without starting any process.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import nanovllm.layers.moe as moe_module
from nanovllm import LLM, SamplingParams
from nanovllm.layers.moe import FusedMoE, SparseMoeBlock, is_sparse_layer, map_expert_weight
from nanovllm.layers.rotary import rope_parameters
from nanovllm.testing import build_checkpoint

# Llama 3.1's scaling with a tiny original context: every prompt + output below but the first crosses 64 positions
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _old_rope_spelling(cfg: dict[str, Any]) -> None:
    """transformers 5 writes ``rope_parameters``; Llama 3.1 on the hub has ``rope_theta`` and ``rope_scaling``."""
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None


def _no_kv_heads_key(cfg: dict[str, Any]) -> None:
    cfg.pop("num_key_value_heads")  # readers must fall back to as many KV heads as query heads


def _local_experts_only(cfg: dict[str, Any]) -> None:
    cfg["num_local_experts"] = cfg.pop("num_experts")


# name -> (architecture, build_checkpoint overrides, config.json rewrite)
VARIANTS: dict[str, tuple[str, dict[str, Any], Callable[[dict[str, Any]], None] | None]] = {
    "llama3-hub-rope-scaling": (
        "LlamaForCausalLM",
        dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=1024, num_key_value_heads=1),
        _old_rope_spelling,
    ),
    "llama2-no-kv-heads-key": ("LlamaForCausalLM", dict(num_key_value_heads=4), _no_kv_heads_key),
    # top-4 of 8 without renormalisation; layer 0 dense
    "qwen3-moe-local-experts": (
        "Qwen3MoeForCausalLM",
        dict(num_hidden_layers=3, num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0]),
        _local_experts_only,
    ),
    # every second layer sparse (1 and 3) but 3 is listed dense: only layer 1 routes; renormalised top-4 + shared
    "qwen2-moe-step-and-dense": (
        "Qwen2MoeForCausalLM",
        dict(num_hidden_layers=4, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=2,
             mlp_only_layers=[3]),
        None,
    ),
}
PROMPT_LENGTHS = (1, 37, 100)
MAX_TOKENS = 16


def _prompts() -> list[list[int]]:
    return [[(11 * i + 5) % 470 + 3 for i in range(n)] for n in PROMPT_LENGTHS]


def _rewrite_config(path: str, rewrite: Callable[[dict[str, Any]], None]) -> None:
    config_path = Path(path) / "config.json"
    cfg = json.loads(config_path.read_text())
    rewrite(cfg)
    config_path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))


def _build_variant(name: str, path: Path, with_tokenizer: bool = True) -> str:
    arch, overrides, rewrite = VARIANTS[name]
    out = build_checkpoint(path, arch, with_tokenizer=with_tokenizer, **overrides)
    if rewrite is not None:
        _rewrite_config(out, rewrite)
    return out


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return request.param, _build_variant(request.param, tmp_path_factory.mktemp(request.param))


def _hf_reference(path: str, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """HF greedy continuations of every prompt, and the log-probabilities of the last prompt's own tokens."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy = []
    with torch.no_grad():
        for prompt in prompts:
            # eos_token_id=None: run to MAX_TOKENS without banning EOS, which is what ignore_eos does
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            greedy.append(out[0, len(prompt):].tolist())
        last = prompts[-1]
        logprobs = model(torch.tensor([last])).logits[0].log_softmax(-1)
    return greedy, logprobs[torch.arange(len(last) - 1), torch.tensor(last[1:])]


def test_matches_hf_greedy_logprobs_chunked_and_preempted(variant: tuple[str, str]) -> None:
    name, path = variant
    prompts = _prompts()
    expected_tokens, expected_logprobs = _hf_reference(path, prompts)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # plain; prefill in chunks of 7 tokens; a 160-token pool for 186 tokens of work, so someone is preempted
    for engine_args in ({}, {"max_num_batched_tokens": 7}, {"num_kv_blocks": 10, "block_size": 16}):
        llm = LLM(path, device="cpu", dtype="float32", **engine_args)
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == expected_tokens, (name, engine_args)
        if "num_kv_blocks" in engine_args:
            assert llm.engine.core.scheduler.num_preemptions > 0
        if not engine_args:  # prefill logits, through the prompt log-probabilities of the same engine
            last = prompts[-1]
            out = llm.generate([last], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
            got_logprobs = torch.tensor([entry[t] for entry, t in zip(out.prompt_logprobs[1:], last[1:])])
            torch.testing.assert_close(got_logprobs, expected_logprobs, atol=1e-4, rtol=1e-4)


def test_llama3_scaling_changes_the_logits(tmp_path: Path) -> None:
    """Guard for the Llama 3 variant: without its ``rope_scaling`` the same weights give other logits, so the
    parity test above does exercise the scaled frequencies."""
    path = _build_variant("llama3-hub-rope-scaling", tmp_path / "scaled", with_tokenizer=False)
    unscaled = shutil.copytree(path, tmp_path / "unscaled")
    _rewrite_config(str(unscaled), lambda cfg: cfg.pop("rope_scaling"))
    prompt = torch.tensor([_prompts()[-1]])
    with torch.no_grad():
        scaled_logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(prompt).logits
        plain_logits = AutoModelForCausalLM.from_pretrained(unscaled, dtype=torch.float32)(prompt).logits
    assert (scaled_logits - plain_logits)[0, 64:].abs().max() > 0.1


def test_rope_parameters_reads_both_spellings() -> None:
    expected = {**LLAMA3_SCALING, "rope_theta": 500000.0}
    new = SimpleNamespace(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0})
    old = SimpleNamespace(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    # the oldest configs say "type" instead of "rope_type"
    oldest = SimpleNamespace(rope_theta=500000.0, rope_scaling={
        "type" if k == "rope_type" else k: v for k, v in LLAMA3_SCALING.items()})
    for config in (new, old, oldest):
        got = rope_parameters(config)
        assert {k: got[k] for k in expected} == expected
    assert rope_parameters(SimpleNamespace()) == {"rope_theta": 10000.0, "rope_type": "default"}


def test_expert_count_under_either_key() -> None:
    base = dict(hidden_size=16, moe_intermediate_size=8, num_experts_per_tok=2, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[1])
    for key in ("num_experts", "num_local_experts"):
        config = SimpleNamespace(**base, **{key: 6})
        assert SparseMoeBlock(config).experts.w13.shape == (6, 16, 16)
        assert [is_sparse_layer(config, i) for i in range(3)] == [True, False, True]


def test_map_expert_weight_table() -> None:
    prefix = "model.layers.3.mlp"
    # names after the packed mapping: gate_proj / up_proj already became gate_up_proj with shard 0 / 1
    assert map_expert_weight(f"{prefix}.experts.5.gate_up_proj.weight", 0) == (f"{prefix}.experts.w13", (5, 0))
    assert map_expert_weight(f"{prefix}.experts.5.gate_up_proj.weight", 1) == (f"{prefix}.experts.w13", (5, 1))
    assert map_expert_weight(f"{prefix}.experts.12.down_proj.weight", None) == (f"{prefix}.experts.w2", (12, None))
    # the shared expert and the routers are ordinary parameters
    for name in (f"{prefix}.shared_expert.gate_up_proj.weight", f"{prefix}.gate.weight",
                 f"{prefix}.shared_expert_gate.weight"):
        assert map_expert_weight(name, 0) == (name, 0)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_expert_shards_sum_to_the_whole(tp_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank loads its slice of every expert's intermediate dimension; the partial outputs (what the all-reduce
    adds up) must sum to the unsharded layer's output."""
    num_experts, hidden_size, inter, top_k = 6, 16, 24, 3
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, num_experts, inter, hidden_size, generator=g, dtype=torch.float64)
    down = torch.randn(num_experts, hidden_size, inter, generator=g, dtype=torch.float64)
    hidden = torch.randn(10, hidden_size, generator=g, dtype=torch.float64)
    router_logits = torch.randn(10, num_experts, generator=g, dtype=torch.float64)

    def build(rank: int, size: int) -> FusedMoE:
        monkeypatch.setattr(moe_module, "get_tp_rank", lambda: rank)
        monkeypatch.setattr(moe_module, "get_tp_size", lambda: size)
        layer = FusedMoE(num_experts, top_k, hidden_size, inter, renormalize=True).double()
        for e in range(num_experts):  # one checkpoint tensor per expert and projection, as the loader hands them
            layer.w13.weight_loader(layer.w13, gate[e], (e, 0))
            layer.w13.weight_loader(layer.w13, up[e], (e, 1))
            layer.w2.weight_loader(layer.w2, down[e], (e, None))
        return layer

    monkeypatch.setattr(moe_module, "tensor_model_parallel_all_reduce", lambda x: x)  # the sum is taken below
    whole = build(0, 1)(hidden, router_logits)
    shards = [build(rank, tp_size) for rank in range(tp_size)]
    assert shards[0].w13.shape == (num_experts, 2 * inter // tp_size, hidden_size)
    partial_sum = sum(shard(hidden, router_logits) for shard in shards)
    torch.testing.assert_close(partial_sum, whole, atol=1e-10, rtol=1e-10)
