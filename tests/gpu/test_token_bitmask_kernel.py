"""The one-launch grammar bitmask against the torch sampler's ``apply_token_bitmask``."""
from __future__ import annotations

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.token_bitmask import mask_disallowed_  # noqa: E402
from nanovllm.layers.sampler import apply_token_bitmask  # noqa: E402

DEVICE = kernel_device()
ON_CPU = DEVICE is not None and DEVICE.type == "cpu"  # the interpreter: smaller cases
pytestmark = kernel_test_marks(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,width", [(1000, 32), (1000, 20), (4099, 129)] if ON_CPU else
                         [(151936, 4748), (151936, 1536), (32000, 1000)])
def test_mask_matches_torch(dtype: torch.dtype, vocab: int, width: int) -> None:
    """Full-width bitmasks, and ones narrower than the head (whose tokens past them are never allowed)."""
    generator = torch.Generator().manual_seed(vocab + width)
    batch = 6 if ON_CPU else 256
    logits = torch.randn(batch, vocab, generator=generator).to(dtype)
    rows = torch.randperm(batch, generator=generator)[: batch // 2].sort().values
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows.numel(), width), dtype=torch.int32, generator=generator)
    bitmask[0] = 0  # a row that allows nothing
    bitmask[-1] = -1  # and one that allows all its bitmask covers
    expected = apply_token_bitmask(logits, rows, bitmask)
    out = logits.to(DEVICE)
    mask_disallowed_(out, rows.to(DEVICE), bitmask.to(DEVICE))
    assert torch.equal(out.cpu(), expected)


def test_no_rows_leaves_the_logits_alone() -> None:
    logits = torch.randn(3, 100).to(DEVICE)
    before = logits.clone()
    mask_disallowed_(logits, torch.empty(0, dtype=torch.int64, device=DEVICE),
                     torch.empty(0, 4, dtype=torch.int32, device=DEVICE))
    assert torch.equal(logits, before)
