"""GPU tests. The Triton kernel tests also run without a GPU, on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets when there is no CUDA); elsewhere they skip."""
from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> torch.device | None:
    """CUDA when present, else the CPU under Triton's interpreter, else None (the kernel tests skip)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    return None


def kernel_test_marks(device: torch.device | None) -> list:
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(device is None, reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter"),
    ]
