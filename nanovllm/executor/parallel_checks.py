"""Start-up checks that a model splits sensibly over ``tensor_parallel_size`` x ``pipeline_parallel_size`` ranks.

They run in the driver before any worker starts, so a bad size is one clear ``ValueError`` naming the model's
dimension and the sizes that would work, not a shape error deep inside a worker.
"""
from __future__ import annotations

from typing import Any

import torch


def _tp_constraints(hf_config: Any) -> list[tuple[str, int, bool]]:
    """(name, value, replicable): the dimensions split over TP ranks. A replicable one (KV heads) may also be
    smaller than the TP size, as long as it divides it: each KV head is then held by several ranks."""
    heads = hf_config.num_attention_heads
    constraints = [("num_attention_heads", heads, False),
                   ("num_key_value_heads", getattr(hf_config, "num_key_value_heads", None) or heads, True)]
    num_experts = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", 0) or 0
    all_sparse = (num_experts > 0 and (getattr(hf_config, "decoder_sparse_step", 1) or 1) == 1
                  and not getattr(hf_config, "mlp_only_layers", None))
    if not all_sparse:  # some layer has a dense MLP
        constraints.append(("intermediate_size", hf_config.intermediate_size, False))
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        value = getattr(hf_config, name, None) if num_experts else None
        if value:
            constraints.append((name, value, False))
    return constraints


def _fits(tp_size: int, value: int, replicable: bool) -> bool:
    return value % tp_size == 0 or (replicable and tp_size % value == 0)


def check_parallel_sizes(hf_config: Any, tp_size: int, pp_size: int) -> None:
    """Raise ``ValueError`` if the model cannot be split this way; the message lists sizes that can."""
    constraints = _tp_constraints(hf_config)
    for name, value, replicable in constraints:
        if not _fits(tp_size, value, replicable):
            limit = hf_config.num_attention_heads
            working = [t for t in range(1, limit + 1) if all(_fits(t, v, r) for _, v, r in constraints)]
            rule = "divisible by it" + (" or divide it" if replicable else "")
            raise ValueError(
                f"tensor_parallel_size={tp_size} does not fit this model: {name} ({value}) must be {rule}; "
                f"sizes that work for this model: {working}"
            )
    num_layers = hf_config.num_hidden_layers
    if pp_size > num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} is more than the model's {num_layers} layers; "
            f"use at most {num_layers} stages"
        )


def check_devices(use_cuda: bool, world_size: int) -> None:
    """Spawned workers take one GPU each on this host."""
    if use_cuda and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"tensor_parallel_size x pipeline_parallel_size = {world_size} ranks need {world_size} GPUs on this "
            f"host, but torch sees {torch.cuda.device_count()}; to span hosts, launch with torchrun-style "
            "environment variables (see README, 'Multi-GPU and multi-host')"
        )
