"""Tiny GGUF files for tests, written from a tiny Hugging Face checkpoint (``testing.build_checkpoint``) as
llama.cpp's converter lays them out: its tensor names, Llama's q/k rows interleaved per head, stacked experts, the
tokenizer's vocabulary, merges and chat template in the metadata, and the 2-D weights in one tensor type.

``gguf`` quantizes the legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) but not the K-quants (Q2_K ... Q6_K); for those
the weights are random blocks with small, finite scales, in the type's exact layout: what a test of the loader needs
is a file whose every value ``gguf`` itself dequantizes, not a good approximation of the checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from nanovllm.loader.gguf import ARCHITECTURES

# bytes of each K-quant block of 256 values, and the offsets of its float16 scale fields
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
             "Q6_K": (210, (208,))}
_NAMES = {  # Hugging Face name part -> GGUF name part
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


def random_k_quant(rows: int, columns: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``rows x columns`` values (``columns`` a multiple of 256) as random ``kind`` blocks with scales in [0.01, 0.02]."""
    block_bytes, scale_offsets = _K_BLOCKS[kind]
    blocks = rng.integers(0, 256, size=(rows, columns // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(0.01, 0.02, size=blocks.shape[:2]).astype(np.float16)
        blocks[:, :, offset : offset + 2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def _encode(weight: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[kind]
    block = GGML_QUANT_SIZES[qtype][0]
    if weight.ndim < 2 or weight.shape[-1] % block:  # as llama.cpp: what the type cannot hold stays float
        return weight.astype(np.float32), None
    if kind in _K_BLOCKS:
        rows = int(np.prod(weight.shape[:-1]))
        blocks = random_k_quant(rows, weight.shape[-1], kind, rng)
        return blocks.reshape(*weight.shape[:-1], blocks.shape[-1]), qtype
    if kind == "F32":
        return weight.astype(np.float32), None
    if kind == "F16":
        return weight.astype(np.float16), None
    return quantize(weight.astype(np.float32), qtype), qtype


def _permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's layout of Llama q/k rows: row ``j * head_dim / 2 + i`` of a head moves to ``2i + j``."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(checkpoint: str, path: str, kind: str = "F32", seed: int = 0) -> str:
    """Write ``checkpoint`` (a tiny ``build_checkpoint`` directory with its tokenizer) to ``path`` with every 2-D
    weight in tensor type ``kind``; norms, biases and routers stay F32, as llama.cpp keeps them."""
    from gguf import GGUFWriter
    from safetensors.torch import load_file

    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    hf_arch = config["architectures"][0]
    arch = next(a for a, (_, cls) in ARCHITECTURES.items() if cls == hf_arch)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(os.listdir(checkpoint)):
        if file.endswith(".safetensors"):
            state.update(load_file(os.path.join(checkpoint, file)))
    writer = GGUFWriter(path, arch)
    _write_metadata(writer, arch, config)
    _write_tokenizer(writer, checkpoint)
    rng = np.random.default_rng(seed)
    for name, tensor in _gguf_tensors(arch, config, state):
        data, qtype = _encode(tensor, "F32" if name.endswith("ffn_gate_inp.weight") else kind, rng)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_metadata(writer: Any, arch: str, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch.endswith("moe"):
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in config:
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _write_tokenizer(writer: Any, checkpoint: str) -> None:
    from transformers import AutoTokenizer

    with open(os.path.join(checkpoint, "tokenizer.json")) as f:
        spec = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3: a control token
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensors(arch: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in state.items():
        value = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            yield "token_embd.weight", value
        elif name == "model.norm.weight":
            yield "output_norm.weight", value
        elif name == "lm_head.weight":
            if not config.get("tie_word_embeddings"):
                yield "output.weight", value
        else:
            _, _, layer, rest = name.split(".", 3)
            part, _, kind = rest.rpartition(".")
            if ".experts." in f".{part}":  # mlp.experts.{e}.gate_proj: stacked over experts below
                _, _, expert, projection = part.split(".")
                experts.setdefault((layer, projection), {})[int(expert)] = value
                continue
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config["num_attention_heads" if part == "self_attn.q_proj" else "num_key_value_heads"]
                value = _permute(value, heads)
            if part == "mlp.shared_expert_gate":
                value = value.reshape(-1)
            yield f"blk.{layer}.{_NAMES[part]}.{kind}", value
    for (layer, projection), by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])
        yield f"blk.{layer}.ffn_{projection.removesuffix('_proj')}_exps.weight", stacked
