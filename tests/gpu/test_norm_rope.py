"""The fused QK-norm + rotary kernel against a float64 reference written here.

Runs on CUDA when present, else under Triton's CPU interpreter (TRITON_INTERPRET=1), else skips. q and k are
strided views of one qkv tensor, as in the model, so the test also checks that v and the other head stay as they
were.
"""
from __future__ import annotations

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.norm_rope import norm_rope_  # noqa: E402
from nanovllm.layers.attention.metadata import KVWrite  # noqa: E402
from nanovllm.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = kernel_device()
pytestmark = kernel_test_marks(DEVICE)

# bf16 rounds the normalised head, the weighted head and the output (each ~2^-9 relative): a few 1e-3 of
# norm-wise error; fp16 has 3 more mantissa bits; fp32 only differs in summation order.
RTOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def reference(positions, x, cos_sin, weight, eps):
    x = x.double()
    if weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    half = x.shape[-1] // 2
    cos = cos_sin[positions, :half].double()[:, None, :]
    sin = cos_sin[positions, half:].double()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,num_q_heads,num_k_heads", [(128, 16, 8), (64, 8, 8), (128, 32, 4), (64, 6, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_matches_reference(dtype, head_dim, num_q_heads, num_k_heads, norm):
    generator = torch.Generator().manual_seed(head_dim * 1000 + num_q_heads * 10 + num_k_heads)
    num_tokens = 37
    rope = RotaryEmbedding(head_dim, 40000, {"rope_theta": 1e6, "rope_type": "default"}).to(DEVICE)
    width = (num_q_heads + 2 * num_k_heads) * head_dim
    qkv = (3 * torch.randn(num_tokens, width, generator=generator)).to(dtype).to(DEVICE)
    positions = torch.cat([torch.tensor([0, 1, 39999]), torch.randint(0, 40000, (num_tokens - 3,), generator=generator)])
    positions = positions.to(DEVICE)
    weights = [(1 + 0.5 * torch.randn(head_dim, generator=generator)).to(dtype).to(DEVICE) for _ in range(2)]
    q_size, kv_size = num_q_heads * head_dim, num_k_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(num_tokens, num_q_heads, head_dim), k.view(num_tokens, num_k_heads, head_dim)
    q_before, k_before, v_before = q.clone(), k.clone(), v.clone()

    q_weight, k_weight = (weights if norm else (None, None))
    out_q, out_k = norm_rope_(positions, q, k, rope.cos_sin_cache, q_weight, k_weight, 1e-6)

    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place, in the qkv tensor
    assert torch.equal(v, v_before)
    cos_sin = rope.cos_sin_cache
    expected_q = reference(positions, q_before, cos_sin, q_weight, 1e-6)
    expected_k = reference(positions, k_before, cos_sin, k_weight, 1e-6)
    for actual, expected in ((q, expected_q), (k, expected_k)):
        assert torch.isfinite(actual).all()
        assert relative_error(actual, expected) < RTOL[dtype]
        for t in range(num_tokens):  # every token, so one wrong row shows
            assert relative_error(actual[t], expected[t]) < 2 * RTOL[dtype]


def test_no_tokens_is_a_no_op():
    rope = RotaryEmbedding(64, 16, {"rope_theta": 10000.0, "rope_type": "default"}).to(DEVICE)
    q, k = torch.empty(0, 4, 64, device=DEVICE), torch.empty(0, 2, 64, device=DEVICE)
    out_q, out_k = norm_rope_(torch.empty(0, dtype=torch.int64, device=DEVICE), q, k, rope.cos_sin_cache)
    assert out_q.shape == (0, 4, 64) and out_k.shape == (0, 2, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("num_k_heads,page", [(8, 16), (3, 5)])  # 3 heads: padded to 4; page 5: no power of two
def test_writes_rotated_k_and_v_into_the_cache(dtype, norm, num_k_heads, page):
    """The KV write fused in: each token's rotated k (bit for bit what it leaves in place) and its v land in its
    slot; padding rows (slot -1) and every other slot stay as they were."""
    generator = torch.Generator().manual_seed(num_k_heads * 100 + page + norm)
    head_dim, num_q_heads, num_tokens, num_blocks = 64, 2 * num_k_heads, 21, 12
    rope = RotaryEmbedding(head_dim, 4096, {"rope_theta": 1e6, "rope_type": "default"}).to(DEVICE)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_k_heads) * head_dim, generator=generator).to(dtype)
    q, k, v = [t.view(num_tokens, -1, head_dim) for t in qkv.to(DEVICE).split(
        [num_q_heads * head_dim, num_k_heads * head_dim, num_k_heads * head_dim], dim=-1)]
    slots = torch.randperm(num_blocks * page, generator=generator)[:num_tokens]
    slots[::5] = -1  # padding rows
    shape = (num_blocks, page, num_k_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()  # before the call: on CPU .to(DEVICE) shares the storage
    positions = torch.randint(0, 4096, (num_tokens,), generator=generator).to(DEVICE)
    weights = [(1 + 0.5 * torch.randn(head_dim, generator=generator)).to(dtype).to(DEVICE) for _ in range(2)]
    q_weight, k_weight = weights if norm else (None, None)
    kv_write = KVWrite(v, k_cache.to(DEVICE), v_cache.to(DEVICE), slots.to(DEVICE))
    k_before = k.clone()

    norm_rope_(positions, q, k, rope.cos_sin_cache, q_weight, k_weight, 1e-6, kv_write=kv_write)

    expected_k = reference(positions, k_before, rope.cos_sin_cache, k_weight, 1e-6).cpu()
    assert relative_error(k.cpu(), expected_k) < RTOL[dtype]  # rotated in place as without the write
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_k[slot // page, slot % page] = k[t].cpu()
            want_v[slot // page, slot % page] = v[t].cpu()
    assert torch.equal(kv_write.k_cache.cpu(), want_k)
    assert torch.equal(kv_write.v_cache.cpu(), want_v)
