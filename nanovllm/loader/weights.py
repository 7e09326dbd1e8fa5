"""Checkpoint tensors into parameters: safetensors (sharded or not), PyTorch ``.bin`` files, GGUF; packed and
per-expert weights; FP8 weights with their scales (each FP8 layer's loader places them; ``process_weights_after_
loading`` then readies its forward); random weights for ``load_format="dummy"``."""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Iterator

import torch
from torch import nn

from nanovllm.checkpoint_slice import CheckpointSlice
from nanovllm.loader.kv_scales import load_kv_scale
from nanovllm.layers.quantization import process_weights_after_loading
from nanovllm.loader.source import is_gguf

logger = logging.getLogger(__name__)


def safetensors_files(path: str) -> list[str]:
    return _weight_files(path, "model.safetensors.index.json", "*.safetensors")


def bin_files(path: str) -> list[str]:
    """PyTorch checkpoints: ``pytorch_model.bin``, or the shards its index names (not any ``*.bin``: a directory
    may hold training arguments under that suffix)."""
    return _weight_files(path, "pytorch_model.bin.index.json", "pytorch_model*.bin")


def _weight_files(path: str, index_name: str, pattern: str) -> list[str]:
    index = os.path.join(path, index_name)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in names]
    return sorted(glob.glob(os.path.join(path, pattern)))


def iter_checkpoint(path: str, config: Any = None) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every checkpoint tensor. safetensors are read lazily (a ``CheckpointSlice``: a tensor-parallel
    rank reads only its shard); ``.bin`` files (where a directory has no safetensors) and GGUF files in full."""
    if is_gguf(path):
        from nanovllm.loader.gguf import iter_tensors

        yield from iter_tensors(path, config)
        return
    if files := safetensors_files(path):
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, CheckpointSlice(f.get_slice(name))
        return
    if files := bin_files(path):
        for file in files:
            yield from _load_bin(file).items()
        return
    raise FileNotFoundError(f"no weights in {path}: no .safetensors, pytorch_model*.bin or .gguf file "
                            "(use load_format='dummy' for random weights)")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    try:  # tensors only (no code runs), memory-mapped where the file's format allows
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def map_weight_name(model: nn.Module, name: str) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard id), by the model's ``packed_modules_mapping``."""
    for checkpoint_part, (param_part, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if f".{checkpoint_part}." in name:
            return name.replace(f".{checkpoint_part}.", f".{param_part}.", 1), shard_id
    return name, None


def load_weights(model: nn.Module, path: str) -> int:
    """Every checkpoint tensor into its parameter; returns how many FP8 KV-cache scales the checkpoint had."""
    params = dict(model.named_parameters())
    skip = set(getattr(model, "skip_weights", ()))
    if getattr(model, "tie_word_embeddings", False):
        skip.add("lm_head.weight")
    loaded: set[str] = set()
    num_kv_scales = 0
    for name, tensor in iter_checkpoint(path, model.config):
        if name in skip or "rotary_emb.inv_freq" in name:
            continue
        if load_kv_scale(model, name, tensor):
            num_kv_scales += 1
            continue
        if name.endswith("_zero_point"):  # compressed-tensors' symmetric FP8 may store zero points: all zeros
            if tensor.float().abs().max() != 0:
                raise ValueError(f"checkpoint tensor {name!r} has non-zero zero points: asymmetric quantization "
                                 "is not supported")
            continue
        param_name, shard_id = map_weight_name(model, name)
        if hasattr(model, "map_expert_weight"):  # MoE: one checkpoint tensor per expert into stacked weights
            param_name, shard_id = model.map_expert_weight(param_name, shard_id)
        param = params.get(param_name)
        if param is None:
            if getattr(model, "is_pipeline_stage", False):
                continue  # a layer another pipeline stage owns
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter ({param_name!r})")
        weight_loader = getattr(param, "weight_loader", _default_weight_loader)
        weight_loader(param, tensor, shard_id)
        loaded.add(param_name)
    # FP8 weights quantized at load bring their scales along; the embedding may stand in for a tied LM head
    derived = {n for n, p in params.items() if getattr(p, "filled_by_weight", False)}
    missing = sorted(set(params) - loaded - derived - {"lm_head.weight"} - skip)
    if missing:
        raise ValueError(f"checkpoint at {path} lacks weights for {missing[:10]}{'...' if len(missing) > 10 else ''}")
    process_weights_after_loading(model)
    return num_kv_scales


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Small random weights, drawn on the parameter's own device: enough for benchmarks and smoke tests. FP8
    layers draw the same uniform values and quantize them in their own format."""
    done: set[int] = set()
    for index, module in enumerate(model.modules()):
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        device = next(module.parameters()).device
        method.init_dummy(module, torch.Generator(device=device).manual_seed(seed * 100003 + 7919 * index + 1),
                          -0.05, 0.05)
        done.update(id(p) for p in module.parameters(recurse=False))
    for index, (name, param) in enumerate(model.named_parameters()):
        if id(param) in done:
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed * 100003 + index)
        param.uniform_(-0.05, 0.05, generator=generator)
    process_weights_after_loading(model)
