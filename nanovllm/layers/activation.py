from __future__ import annotations

import torch
from torch import nn


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a tensor holding ``[gate | up]`` in its last dimension (a Triton kernel on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanovllm.kernels.activation import silu_and_mul

            return silu_and_mul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], x.shape[-1] // 2)
        return silu_and_mul_reference(x)
