"""Shared pytest fixtures: tiny random checkpoints, each built once per session and only when asked for."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

# Without a GPU, the Triton kernel tests run on CPU tensors under Triton's interpreter (set before any test
# module imports triton). They check indexing and arithmetic, not GPU code generation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanovllm.testing import build_checkpoint


def _checkpoint_fixture(name: str, arch: str, **kwargs: Any) -> Callable[..., str]:
    @pytest.fixture(scope="session", name=name)
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> str:
        path = tmp_path_factory.mktemp(name)
        return build_checkpoint(path, arch, dtype=torch.float32, with_tokenizer=True, **kwargs)

    _fixture.__doc__ = f"Path of a tiny float32 {arch} checkpoint with tokenizer ({kwargs or 'defaults'})."
    return _fixture


qwen3_dir = _checkpoint_fixture("qwen3_dir", "Qwen3ForCausalLM", tie_word_embeddings=False)
qwen3_tied_dir = _checkpoint_fixture("qwen3_tied_dir", "Qwen3ForCausalLM", tie_word_embeddings=True)
qwen2_dir = _checkpoint_fixture("qwen2_dir", "Qwen2ForCausalLM")
llama_dir = _checkpoint_fixture("llama_dir", "LlamaForCausalLM")
qwen2_moe_dir = _checkpoint_fixture("qwen2_moe_dir", "Qwen2MoeForCausalLM")
qwen3_moe_dir = _checkpoint_fixture("qwen3_moe_dir", "Qwen3MoeForCausalLM")
