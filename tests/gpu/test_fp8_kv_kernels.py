"""The Triton kernels on an FP8 KV cache: writes bit for bit what the torch reference quantizer makes (itself checked
against torch's own float8 casts), and attention against a float64 reference over the dequantized cache.

Dequantizing is exact (every FP8 value is a bf16 value), so the attention bounds are those of a bf16 cache: the
kernels' own roundings (P to bf16, the output) are the only error."""
from __future__ import annotations

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from gpu.test_attention_kernels import (  # noqa: E402
    SMALL, check_close, decode_lens, make_paged_kv, mixed_batch, reference_attention, to_dev,
)
from nanovllm.kernels.kv_write import store_kv  # noqa: E402
from nanovllm.kernels.norm_rope import norm_rope_  # noqa: E402
from nanovllm.kernels.paged_decode import paged_decode  # noqa: E402
from nanovllm.kernels.paged_prefill import paged_prefill  # noqa: E402
from nanovllm.layers.attention.kv_quant import dequantize_kv, quantize_kv  # noqa: E402
from nanovllm.layers.attention.metadata import KVWrite  # noqa: E402
from nanovllm.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = kernel_device()
pytestmark = kernel_test_marks(DEVICE)
FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]
FORMAT_IDS = ["e4m3", "e5m2"]


def assert_same_cache(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


# Triton's CPU interpreter converts to FP8 inexactly (126.4 becomes 64: a rounding carry into the exponent is lost),
# so the kernels that quantize are checked on the GPU only; the attention kernels read caches torch quantized
needs_gpu_conversion = pytest.mark.skipif(DEVICE is None or DEVICE.type != "cuda",
                                          reason="the interpreter's float8 conversion is not exact")


def scales(k_scale: float, v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([k_scale], dtype=torch.float32, device=DEVICE),
            torch.tensor([v_scale], dtype=torch.float32, device=DEVICE))


def quantized_cache(cache: torch.Tensor, scale: float, fp8: torch.dtype) -> torch.Tensor:
    return quantize_kv(cache, torch.tensor([scale]), fp8)


@pytest.mark.parametrize("fp8", FORMATS, ids=FORMAT_IDS)
def test_reference_quantizer_is_torchs_cast_with_saturation(fp8: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 300  # e4m3 saturates past 448 (in units of the scale)
    scale = torch.tensor([0.7])
    limit = torch.finfo(fp8).max
    expected = (x / scale).clamp(-limit, limit).to(fp8)
    got = quantize_kv(x.to(torch.bfloat16), scale, fp8)
    assert torch.equal(got.view(torch.uint8), (x.to(torch.bfloat16).float() / scale).clamp(-limit, limit).to(fp8)
                       .view(torch.uint8))
    assert not got.float().isnan().any()
    # the round trip: back within half an FP8 step of the (clamped) input
    back = dequantize_kv(expected, scale, torch.float32)
    assert torch.equal(back, expected.float() * scale)


@needs_gpu_conversion
@pytest.mark.parametrize("fp8", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_kv_quantizes_bit_for_bit(fp8: torch.dtype, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, page, num_kv_heads, head_dim, num_tokens = 6, 16, 2, 128, 40
    slots = torch.randperm(num_blocks * page, generator=gen)[:num_tokens]
    slots[::7] = -1
    qkv = (torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen) * 40).to(dtype)
    k, v = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    shape = (num_blocks, page, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(fp8)
    v_cache = torch.randn(shape, generator=gen).to(fp8)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    k_scale, v_scale = 0.09, 0.3  # some values saturate
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page] = quantize_kv(k[t], torch.tensor([k_scale]), fp8)
            want_v[s // page, s % page] = quantize_kv(v[t], torch.tensor([v_scale]), fp8)

    k_d, v_d, kc_d, vc_d, slots_d = to_dev(k, v, k_cache, v_cache, slots)
    store_kv(k_d, v_d, kc_d, vc_d, slots_d, *scales(k_scale, v_scale))
    assert_same_cache(kc_d, want_k)
    assert_same_cache(vc_d, want_v)


@needs_gpu_conversion
@pytest.mark.parametrize("fp8", FORMATS, ids=FORMAT_IDS)
def test_rotary_kernel_writes_quantized_k_and_v(fp8: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    dtype, head_dim, num_k_heads, num_q_heads, num_tokens, num_blocks, page = torch.bfloat16, 64, 2, 4, 21, 8, 16
    rope = RotaryEmbedding(head_dim, 4096, {"rope_theta": 1e6, "rope_type": "default"}).to(DEVICE)
    qkv = (torch.randn(num_tokens, (num_q_heads + 2 * num_k_heads) * head_dim, generator=gen) * 8).to(dtype)
    q, k, v = [t.view(num_tokens, -1, head_dim) for t in qkv.to(DEVICE).split(
        [num_q_heads * head_dim, num_k_heads * head_dim, num_k_heads * head_dim], dim=-1)]
    slots = torch.randperm(num_blocks * page, generator=gen)[:num_tokens]
    slots[::5] = -1
    shape = (num_blocks, page, num_k_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=fp8), torch.zeros(shape, dtype=fp8)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    k_scale, v_scale = scales(0.02, 0.05)
    kv_write = KVWrite(v, k_cache.to(DEVICE), v_cache.to(DEVICE), slots.to(DEVICE), k_scale, v_scale)
    norm_rope_(positions, q, k, rope.cos_sin_cache, kv_write=kv_write)  # k is rotated in place

    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_k[slot // page, slot % page] = quantize_kv(k[t].cpu(), k_scale.cpu(), fp8)
            want_v[slot // page, slot % page] = quantize_kv(v[t].cpu(), v_scale.cpu(), fp8)
    assert_same_cache(kv_write.k_cache, want_k)
    assert_same_cache(kv_write.v_cache, want_v)


def fp8_paged_kv(seq_lens: list[int], page: int, head_dim: int, fp8: torch.dtype, gen: torch.Generator,
                 k_scale: float, v_scale: float):
    """Random FP8 caches (values spread over the format's range once scaled) and their float64 dequantization."""
    k_cache, v_cache, table = make_paged_kv(seq_lens, page, head_dim, torch.float32, gen)
    k_q = quantized_cache(k_cache * 3 * k_scale, k_scale, fp8)
    v_q = quantized_cache(v_cache * 3 * v_scale, v_scale, fp8)
    return k_q, v_q, k_q.double() * k_scale, v_q.double() * v_scale, table


@pytest.mark.parametrize("fp8", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,num_splits", [(1, 1), (4, 3), (8, 1)] + ([] if SMALL else [(2, 8), (4, 16)]))
def test_paged_decode_on_fp8(fp8: torch.dtype, dtype: torch.dtype, group: int, num_splits: int) -> None:
    gen = torch.Generator().manual_seed(10 * group + num_splits)
    page, head_dim = 16, 128
    seq_lens = decode_lens(page)
    k_scale, v_scale = 0.04, 0.25
    k_q, v_q, k_ref, v_ref, table = fp8_paged_kv(seq_lens, page, head_dim, fp8, gen, k_scale, v_scale)
    num_heads = k_q.shape[2] * group
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_ref, v_ref, table, seq_lens, [1] * len(seq_lens), scale)
    q_d, kc_d, vc_d, table_d = to_dev(q, k_q, v_q, table)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode(q_d, kc_d, vc_d, table_d, lens, scale, num_splits=num_splits, k_scale=scales(k_scale, 1)[0],
                       v_scale=scales(v_scale, 1)[0])
    check_close(out, ref, [1] * len(seq_lens), dtype)


@pytest.mark.parametrize("fp8", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("group", [1, 4])
def test_paged_prefill_on_fp8(fp8: torch.dtype, group: int) -> None:
    gen = torch.Generator().manual_seed(group)
    page, head_dim, dtype = 16, 64, torch.bfloat16
    seq_lens, q_lens = mixed_batch(page)
    k_scale, v_scale = 0.5, 0.02
    k_q, v_q, k_ref, v_ref, table = fp8_paged_kv(seq_lens, page, head_dim, fp8, gen, k_scale, v_scale)
    num_heads, num_tokens = k_q.shape[2] * group, sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_ref, v_ref, table, seq_lens, q_lens, scale)
    q_d, kc_d, vc_d, table_d = to_dev(q, k_q, v_q, table)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    out = paged_prefill(q_d, kc_d, vc_d, table_d, lens, qsl, scale, k_scale=scales(k_scale, 1)[0],
                        v_scale=scales(v_scale, 1)[0])
    check_close(out, ref, q_lens, dtype)
