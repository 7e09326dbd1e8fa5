"""Model classes keyed by the ``architectures`` name in a Hugging Face config."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# architecture -> (module under nanovllm.models, class name); imported lazily so one family's import cost or
# optional dependency never touches another's
_MODELS: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config: Any) -> type[nn.Module]:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch]
            module = importlib.import_module(f"nanovllm.models.{module_name}")
            return getattr(module, class_name)
    raise ValueError(
        f"model architectures {architectures} are not supported; supported architectures: {supported_architectures()}"
    )
