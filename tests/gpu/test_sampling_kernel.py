"""The one-pass Gumbel-max sampling kernel against the torch sampler's own noise."""
from __future__ import annotations

import math

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from nanovllm.kernels.sampling import _exponential, _uniform  # noqa: E402
from nanovllm.layers.sampler import row_keys, uniform_from_bits, uniform_noise  # noqa: E402

DEVICE = kernel_device()
ON_CPU = DEVICE is not None and DEVICE.type == "cpu"  # the interpreter: smaller cases
pytestmark = kernel_test_marks(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 4099] if ON_CPU else [1000, 151936])
def test_gumbel_argmax_matches_torch(dtype: torch.dtype, vocab: int) -> None:
    from nanovllm.kernels.sampling import gumbel_argmax

    generator = torch.Generator().manual_seed(vocab)
    batch = 8 if ON_CPU else 256
    logits = (torch.randn(batch, vocab, generator=generator) * 4).to(dtype)
    keys = row_keys(torch.randint(0, 2**62, (batch,), generator=generator), torch.randint(0, 4096, (batch,)))
    temperatures = torch.rand(batch, generator=generator) * 1.5
    temperatures[::4] = 0.0  # some greedy rows
    is_random = temperatures > 0
    inv_t = 1.0 / torch.where(is_random, temperatures, 1.0)

    gumbel = -torch.log(-torch.log(uniform_noise(keys, vocab)))
    expected = (logits.float() * inv_t[:, None] + torch.where(is_random[:, None], gumbel, 0.0)).argmax(-1)
    out = gumbel_argmax(logits.to(DEVICE), inv_t.to(DEVICE), keys.to(DEVICE), is_random.to(DEVICE)).cpu()

    assert torch.equal(out[~is_random], logits.float().argmax(-1)[~is_random])
    # the two logarithm implementations may round differently; a near-tie could then flip, so allow a rare miss
    assert (out == expected).float().mean() >= 0.99


@pytest.mark.parametrize("num_chunks", [1, 3, 7])
def test_ties_go_to_the_earliest_token_across_chunks(num_chunks: int) -> None:
    from nanovllm.kernels.sampling import gumbel_argmax

    batch, vocab = 6, 200
    logits = torch.zeros(batch, vocab)
    logits[0, [5, 150]] = 3.0  # a tie between the first and the last chunk
    logits[1, [60, 61, 199]] = 2.0
    logits[2, 199] = 1.0  # the very last token
    logits[3] = -1.0  # all equal: token 0
    logits[4, [6, 33]] = 4.0  # a tie across blocks where the earlier token sits in the later lane (6 against 1)
    logits[5] = float("-inf")  # nothing allowed: token 0, as torch.argmax
    off = torch.zeros(batch, dtype=torch.bool)
    out = gumbel_argmax(logits.to(DEVICE), torch.ones(batch, device=DEVICE), torch.zeros(batch, dtype=torch.int64,
                        device=DEVICE), off.to(DEVICE), num_chunks=num_chunks, block=32).cpu()
    assert out.tolist() == [5, 60, 199, 0, 6, 0]


@triton.jit
def _uniforms_of(bits_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _uniform(tl.load(bits_ptr + i).to(tl.uint32)))


def test_kernel_uniforms_stay_strictly_inside_the_unit_interval() -> None:
    bits = torch.tensor([0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFFFE, 0xFFFFFFFF], dtype=torch.int64)
    out = torch.empty(8, dtype=torch.float32, device=DEVICE)
    _uniforms_of[(1,)](bits.to(DEVICE), out, N=8)
    assert bool(((out > 0) & (out < 1)).all()), out
    assert torch.equal(out.cpu(), uniform_from_bits(bits))


@triton.jit
def _exponentials_of(bits_ptr, out_ptr, N: tl.constexpr, INTERP: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _exponential(tl.load(bits_ptr + i).to(tl.uint32), INTERP))


def test_kernel_exponential_noise_is_accurate_near_u_equal_one() -> None:
    """``-ln u`` to a few parts in a million relative, where it matters most: u next to 1 (tiny values, the
    largest Gumbel noise), around the switch between series and logarithm (1 - u = 1/16), and across (0, 1)."""
    from nanovllm.kernels import INTERPRET

    top = (1 << 23) - 1
    ks = [top, top - 1, top - 2, top - 100, top - (1 << 19) + 1, top - (1 << 19), top - (1 << 19) - 1,
          1 << 22, 12345, 1, 0]
    ks += torch.randint(0, 1 << 23, (53,), generator=torch.Generator().manual_seed(5)).tolist()
    bits = torch.tensor([(k << 9) | 0x155 for k in ks], dtype=torch.int64)  # the low 9 bits are ignored
    out = torch.empty(len(ks), dtype=torch.float32, device=DEVICE)
    _exponentials_of[(1,)](bits.to(DEVICE), out, N=len(ks), INTERP=INTERPRET)
    expected = torch.tensor([-math.log((k + 0.5) / (1 << 23)) for k in ks], dtype=torch.float64)
    relative = ((out.cpu().double() - expected) / expected).abs()
    assert relative.max().item() < 5e-6, (ks[int(relative.argmax())], relative.max().item())
