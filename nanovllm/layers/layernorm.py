"""RMSNorm, with the residual add fused in when a residual is passed."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm.layers.fusion import add_rms_norm, compiled_add_rms_norm, compiled_rms_norm, rms_norm
from nanovllm.layers.linear import LinearOutput, PartialSums


class RMSNorm(nn.Module):
    """``fused``: run as torch.compile'd kernels on CUDA (the fast path)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, fused: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self._norm = compiled_rms_norm if fused else rms_norm
        self._add_norm = compiled_add_rms_norm if fused else add_rms_norm

    def forward(
        self, x: LinearOutput, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, PartialSums):  # split-K output: the sum is folded into this kernel
            from nanovllm.kernels.split_k import partials_add_rms_norm

            assert residual is not None, "partial sums need the residual add they are folded into"
            return partials_add_rms_norm(x.partials, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)
