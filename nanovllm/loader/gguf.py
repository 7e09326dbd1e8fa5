"""GGUF files (llama.cpp's format): the model config from the metadata, and the weights, dequantized at load.

The file is read with the ``gguf`` package, llama.cpp's own reader, which also dequantizes every common tensor type.
The metadata is mapped to a Hugging Face config here rather than through transformers, which leaves out the expert
sizes of MoE files, Qwen3's head size and rope scaling. Tensor names become the Hugging Face names the rest of the
loader already maps to parameters. llama.cpp's converter stores Llama-family q/k projections with the rows of each
head interleaved (its rotary layout); they are put back in the rotate-half order used here.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# GGUF architecture -> (Hugging Face model_type, our model class)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.lru_cache(maxsize=2)
def read(path: str) -> Any:
    """The file's reader (opening one parses the whole vocabulary: seconds for a large one, so it is kept)."""
    from gguf import GGUFReader

    return GGUFReader(path)


def metadata(path: str) -> dict[str, Any]:
    """Every scalar and string field, and array fields other than the vocabulary's."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for name, field in read(path).fields.items():
        if not (name.startswith("tokenizer.ggml.") and field.types[0] == GGUFValueType.ARRAY) and field.types:
            out[name] = field.contents()
    return out


def architecture(path: str) -> str:
    arch = metadata(path).get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} in {path} is not supported; supported: {sorted(ARCHITECTURES)}")
    return arch


def cache_dir(path: str) -> str:
    """Where the config and tokenizer converted from a GGUF file are kept, so that later starts skip parsing its
    vocabulary (seconds): keyed by the file's name, size and modification time. ``NANOVLLM_CACHE`` moves it."""
    stat = os.stat(path)
    root = os.environ.get("NANOVLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanovllm")
    return os.path.join(root, "gguf", f"{os.path.basename(path)}-{stat.st_size}-{stat.st_mtime_ns}")


def _cached(path: str, kind: str, build: Any, load: Any) -> Any:
    """``load(dir)`` from the cache, or ``build()``, saved there (atomically) for the next start."""
    target = os.path.join(cache_dir(path), kind)
    if os.path.isdir(target):
        try:
            return load(target)
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            logger.warning("the cached %s of %s could not be read; rebuilding it", kind, path, exc_info=True)
    value = build()
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(target))
        value.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError:  # a read-only home: no cache, every start converts again
        logger.debug("could not cache the %s of %s", kind, path, exc_info=True)
    return value


def load_config(path: str) -> Any:
    """A Hugging Face config (with ``architectures``) from the file's metadata."""
    from transformers import AutoConfig

    return _cached(path, "config", lambda: _config_from_metadata(path), AutoConfig.from_pretrained)


def _config_from_metadata(path: str) -> Any:
    from transformers import AutoConfig

    arch = architecture(path)
    meta = metadata(path)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts: fine only when all layers agree
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{path}: layers with different numbers of KV heads are not supported")
        kv_heads = kv_heads[0]
    tensors = {t.name for t in read(path).tensors}
    model_type, model_class = ARCHITECTURES[arch]
    config: dict[str, Any] = dict(
        architectures=[model_class],
        vocab_size=get("vocab_size") or len(read(path).fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_parameters=_rope_parameters(path, get),
        tie_word_embeddings="output.weight" not in tensors,
    )
    for gguf_key, key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        token = _token_id(path, f"tokenizer.ggml.{gguf_key}_token_id")
        if token is not None:
            config[f"{key}_token_id"] = token
    if arch == "llama":
        config.update(attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors)
    if arch.endswith("moe"):
        config.update(
            num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
            moe_intermediate_size=get("expert_feed_forward_length"), decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=arch == "qwen3moe",  # as llama.cpp runs them
        )
        if arch == "qwen2moe":
            config["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length")
    return AutoConfig.for_model(model_type, **config)


def _token_id(path: str, key: str) -> int | None:
    field = read(path).fields.get(key)
    return int(field.contents()) if field is not None else None


def _rope_parameters(path: str, get: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type")
    if scaling in ("linear",):
        params.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (supported: none, linear)")
    freqs = next((t for t in read(path).tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # Llama 3.1's scaling, stored as a divisor per rotary frequency
        params.update(rope_type="freq_factors", freq_factors=_dequantize(freqs).reshape(-1).tolist())
    return params


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf import dequantize

    kind = tensor.tensor_type.name
    if kind not in DEQUANTIZABLE:
        raise ValueError(f"GGUF tensor {tensor.name} has type {kind}, which is not supported "
                         f"(supported: {', '.join(DEQUANTIZABLE)})")
    return dequantize(tensor.data, tensor.tensor_type)  # float32, in torch's (rows, columns) order


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp stores row ``2i + j`` of each head where Hugging Face has row ``j * head_dim / 2 + i``."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iter_tensors(path: str, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every weight in the file; stacked experts come one expert at a time."""
    arch = architecture(path)
    for tensor in read(path).tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # in the config's rope parameters
        base, _, kind = tensor.name.rpartition(".")
        if base in _GLOBAL_TENSORS:
            yield f"{_GLOBAL_TENSORS[base]}.{kind}", torch.from_numpy(np.array(_dequantize(tensor)))
            continue
        match = _LAYER_NAME.fullmatch(tensor.name)
        if match is None or (match.group(2) not in _LAYER_TENSORS and match.group(2) not in _EXPERT_TENSORS):
            raise ValueError(f"GGUF tensor {tensor.name!r} in {path} has no counterpart in the {arch} model")
        layer, part, kind = match.groups()
        weight = torch.from_numpy(np.array(_dequantize(tensor)))
        prefix = f"model.layers.{layer}"
        if part in _EXPERT_TENSORS:
            for expert in range(weight.shape[0]):
                yield f"{prefix}.mlp.experts.{expert}.{_EXPERT_TENSORS[part]}.{kind}", weight[expert]
            continue
        if arch == "llama" and part in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if part == "attn_q" else config.num_key_value_heads
            weight = _unpermute(weight, heads)
        if part == "ffn_gate_inp_shexp":
            weight = weight.reshape(1, -1)  # a 1 x hidden projection
        yield f"{prefix}.{_LAYER_TENSORS[part]}.{kind}", weight


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer and chat template stored in the file, as transformers builds them (``gguf_file=``)."""
    from transformers import AutoTokenizer

    def build() -> Any:
        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                             trust_remote_code=trust_remote_code)

    return _cached(path, "tokenizer", build, AutoTokenizer.from_pretrained)
