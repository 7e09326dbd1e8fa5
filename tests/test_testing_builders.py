"""The tiny-checkpoint builders of nanovllm.testing produce what transformers loads and what tests need."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanovllm.testing import (
    ARCHITECTURES,
    CORPUS,
    EOS_TOKEN,
    IM_END,
    IM_START,
    PRESETS,
    QWEN3_0_6B_CONFIG,
    build_checkpoint,
    build_tokenizer,
    tiny_config_dict,
    write_config_only,
)

FIXTURES = {
    "qwen3_dir": "Qwen3ForCausalLM",
    "qwen3_tied_dir": "Qwen3ForCausalLM",
    "qwen2_dir": "Qwen2ForCausalLM",
    "llama_dir": "LlamaForCausalLM",
    "qwen2_moe_dir": "Qwen2MoeForCausalLM",
    "qwen3_moe_dir": "Qwen3MoeForCausalLM",
}
PROMPTS = ["Hello, world!", "The capital of France is", "Once upon a time"]
ROUND_TRIP_TEXTS = [
    "Hello, world!",
    " leading space, trailing space ",
    "  two spaces\n\nnew lines\tand a tab\r\n",
    "Numbers: 3.14159, 2,048 and -17; it's 9:30 p.m.",
    "Unicode: café, naïve, Ünïcödé, 日本語, emoji 🙂!",
    "Q: What's \"quoted\"? A: (parens) [brackets] {braces} <angle> #hash @at $5 100% a&b ~/path_x",
]


def _keys(path: str | Path) -> set[str]:
    keys: set[str] = set()
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    return keys


@torch.no_grad()
def _greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    step, cache = torch.tensor([ids]), None
    for _ in range(n):
        result = model(step, past_key_values=cache, use_cache=True)
        cache = result.past_key_values
        out.append(int(result.logits[0, -1].argmax()))
        step = torch.tensor([[out[-1]]])
    return out


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_specials_and_chat_template(tmp_path: Path) -> None:
    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert 400 <= len(tok) <= 512
    for text in ROUND_TRIP_TEXTS + CORPUS.splitlines():
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode(CORPUS)) == CORPUS
    # English compresses: fewer tokens than characters by a good margin
    assert len(tok.encode(CORPUS)) < 0.5 * len(CORPUS)

    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.pad_token_id == tok.eos_token_id
    special_ids = tok.convert_tokens_to_ids([EOS_TOKEN, IM_START, IM_END])
    expected = tiny_config_dict("Qwen3ForCausalLM")
    assert special_ids[0] == expected["eos_token_id"] == expected["bos_token_id"] == expected["pad_token_id"]
    for token, token_id in zip([EOS_TOKEN, IM_START, IM_END], special_ids):
        assert tok.encode(token) == [token_id]
    ids = tok.encode("hi" + IM_END)
    assert tok.decode(ids, skip_special_tokens=True) == "hi"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_tokenizer(a)
    build_tokenizer(b)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_fixture_checkpoint_loads_and_generates_diverse_tokens(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    arch = FIXTURES[fixture]
    files = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files

    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [arch]
    assert config.vocab_size == 512 and config.hidden_size == 64 and config.num_hidden_layers == 2
    assert config.rope_parameters["rope_theta"] == 10000.0
    generation = json.loads((Path(path) / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert generation["eos_token_id"] == config.eos_token_id == tok.eos_token_id
    assert len(tok) <= config.vocab_size
    assert tok.chat_template

    tied = fixture == "qwen3_tied_dir"
    assert config.tie_word_embeddings is tied
    keys = _keys(path)
    assert ("lm_head.weight" in keys) is not tied
    if "Moe" in arch:  # hub layout: one tensor per expert and projection
        assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
        assert "model.layers.0.mlp.experts.0.down_proj.weight" in keys
        assert "model.layers.0.mlp.gate.weight" in keys
    if arch == "Qwen2MoeForCausalLM":
        assert "model.layers.0.mlp.shared_expert.up_proj.weight" in keys
        assert "model.layers.0.mlp.shared_expert_gate.weight" in keys

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert next(model.parameters()).dtype == torch.float32
    all_tokens: set[int] = set()
    for prompt in PROMPTS:
        out = _greedy(model, tok.encode(prompt), 30)
        assert len(set(out)) >= 5, (prompt, out)
        all_tokens.update(out)
    assert len(all_tokens) >= 20
    logits = model(torch.tensor([tok.encode(PROMPTS[0])])).logits[0, -1]
    assert logits.std() > 1.0  # not all nearly equal


def test_sharded_checkpoint_matches_unsharded(tmp_path: Path) -> None:
    one = build_checkpoint(tmp_path / "one", "Qwen3ForCausalLM", seed=3, with_tokenizer=False)
    three = build_checkpoint(tmp_path / "three", "Qwen3ForCausalLM", seed=3, with_tokenizer=False, num_shards=3)
    shards = sorted(Path(three).glob("*.safetensors"))
    assert len(shards) == 3
    assert not (Path(three) / "model.safetensors").exists()
    index = json.loads((Path(three) / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert set(index["weight_map"]) == _keys(three) == _keys(one)

    ids = torch.tensor([[5, 17, 42, 99, 300]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(one)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(three)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_build_is_deterministic_and_seed_matters(tmp_path: Path) -> None:
    paths = [
        build_checkpoint(tmp_path / name, "LlamaForCausalLM", seed=seed, with_tokenizer=False)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    blobs = [(Path(p) / "model.safetensors").read_bytes() for p in paths]
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]
    before = torch.random.get_rng_state()
    build_checkpoint(tmp_path / "d", "LlamaForCausalLM", seed=5, with_tokenizer=False)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone


def test_overrides_and_dtype(tmp_path: Path) -> None:
    llama = build_checkpoint(
        tmp_path / "llama3", "LlamaForCausalLM", rope_scaling="llama3", rope_theta=500000.0, with_tokenizer=False
    )
    rope = AutoConfig.from_pretrained(llama).rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert rope["original_max_position_embeddings"] == 256 and rope["factor"] == 4.0

    moe = build_checkpoint(
        tmp_path / "moe",
        "Qwen2MoeForCausalLM",
        num_hidden_layers=3,
        decoder_sparse_step=2,
        mlp_only_layers=[2],
        with_tokenizer=False,
    )
    keys = _keys(moe)
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense: (0 + 1) % 2 != 0
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in keys  # sparse
    assert "model.layers.2.mlp.up_proj.weight" in keys  # dense: mlp_only_layers
    AutoModelForCausalLM.from_pretrained(moe)

    bf16 = build_checkpoint(tmp_path / "bf16", "Qwen3MoeForCausalLM", dtype=torch.bfloat16, with_tokenizer=False)
    assert json.loads((Path(bf16) / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(Path(bf16) / "model.safetensors"), framework="pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16

    with pytest.raises(ValueError, match="arch"):
        build_checkpoint(tmp_path / "bad", "GPT2LMHeadModel")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_config_dict(arch: str) -> None:
    cfg = tiny_config_dict(arch, num_hidden_layers=3)
    assert cfg["architectures"] == [arch] and cfg["num_hidden_layers"] == 3
    assert cfg["vocab_size"] == 512 and cfg["max_position_embeddings"] == 1024
    if "Moe" in arch:
        assert cfg["num_experts"] == 8 and cfg["num_experts_per_tok"] == 3 and cfg["moe_intermediate_size"] == 32


# ------------------------------------------------------------------------------- config only

SHAPE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "eos_token_id",
    "bos_token_id",
    "rms_norm_eps",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_write_config_only_round_trips(preset: str, tmp_path: Path) -> None:
    path = write_config_only(tmp_path, preset)
    assert sorted(p.name for p in Path(path).iterdir()) == ["config.json"]
    config = AutoConfig.from_pretrained(path)
    expected = PRESETS[preset]
    assert config.architectures == expected["architectures"]
    for key in SHAPE_KEYS:
        if key in expected:
            assert getattr(config, key) == expected[key], key
    assert config.dtype == torch.bfloat16
    rope = config.rope_parameters
    assert rope["rope_theta"] == expected["rope_theta"]
    if expected.get("rope_scaling"):
        for key, value in expected["rope_scaling"].items():
            assert rope[key] == value, key
    else:
        assert rope["rope_type"] == "default"


def test_write_config_only_dict_overrides_and_tokenizer(tmp_path: Path) -> None:
    assert QWEN3_0_6B_CONFIG["hidden_size"] == 1024 and QWEN3_0_6B_CONFIG["num_hidden_layers"] == 28
    path = write_config_only(tmp_path / "a", QWEN3_0_6B_CONFIG, num_hidden_layers=2)
    config = AutoConfig.from_pretrained(path)
    assert config.num_hidden_layers == 2 and config.head_dim == 128 and config.tie_word_embeddings is True
    path = write_config_only(tmp_path / "b", "llama-3.1-8b", with_tokenizer=True)
    assert AutoTokenizer.from_pretrained(path).eos_token == EOS_TOKEN
    with pytest.raises(ValueError, match="preset"):
        write_config_only(tmp_path / "c", "qwen9-1t")
