"""The SwiGLU gate kernel against eager torch (``silu(gate) * up``).

Runs on CUDA when present, else under Triton's CPU interpreter (TRITON_INTERPRET=1), else skips."""
from __future__ import annotations

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.activation import silu_and_mul  # noqa: E402
from nanovllm.layers.activation import silu_and_mul_reference  # noqa: E402

DEVICE = kernel_device()
pytestmark = kernel_test_marks(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,d", [(1, 64), (7, 3072), (33, 1000)])  # 1000: a width that is no power of two
def test_matches_eager_torch(dtype: torch.dtype, num_tokens: int, d: int) -> None:
    generator = torch.Generator().manual_seed(d + num_tokens)
    x = (torch.randn(num_tokens, 2 * d, generator=generator) * 3).to(dtype).to(DEVICE)
    out = silu_and_mul(x, block=256)
    assert out.shape == (num_tokens, d) and out.dtype == dtype
    # against float32 math rounded once; the kernel rounds silu to the dtype first, as eager torch on CUDA does,
    # so they may differ by a rounding step: torch's default tolerance for the dtype covers that
    torch.testing.assert_close(out, silu_and_mul_reference(x.float()).to(dtype))


def test_reads_rows_of_a_strided_view() -> None:
    x = torch.randn(6, 2 * 128 + 5, dtype=torch.bfloat16, device=DEVICE)[:, : 2 * 128]  # rows longer than 2d
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x.float()).to(torch.bfloat16))
