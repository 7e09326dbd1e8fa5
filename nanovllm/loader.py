"""From a model name to loaded parameters: hub download, config, safetensors, packed and sharded weights."""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Iterator

import torch
from torch import nn

from nanovllm.checkpoint_slice import CheckpointSlice

logger = logging.getLogger(__name__)


def resolve_model_path(model: str, revision: str | None = None, weights: bool = True) -> str:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded (or found in the local hub cache)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.jinja"] + (["*.safetensors"] if weights else [])
    logger.info("fetching %s from the Hugging Face hub", model)
    return snapshot_download(model, revision=revision, allow_patterns=patterns)


def load_hf_config(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path} (use load_format='dummy' for random weights)")
    return files


def iter_checkpoint(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (name, lazy slice) for every tensor; slicing reads only the part a rank needs."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


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


def load_weights(model: nn.Module, path: str) -> None:
    params = dict(model.named_parameters())
    skip = set(getattr(model, "skip_weights", ()))
    if getattr(model, "tie_word_embeddings", False):
        skip.add("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor_slice in iter_checkpoint(path):
        if name in skip or "rotary_emb.inv_freq" in name:
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
        weight_loader(param, CheckpointSlice(tensor_slice), shard_id)  # a TP rank reads only its shard
        loaded.add(param_name)
    missing = sorted(set(params) - loaded - {"lm_head.weight"} - skip)
    if missing:
        raise ValueError(f"checkpoint at {path} lacks weights for {missing[:10]}{'...' if len(missing) > 10 else ''}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Small random weights, drawn on the parameter's own device: enough for benchmarks and smoke tests."""
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed * 100003 + index)
        param.uniform_(-0.05, 0.05, generator=generator)
