"""MoE routing and the torch expert reference, on CPU.

``moe_reference`` is the oracle for the Triton kernel, so it is itself checked against a dense
computation written differently: every expert on every token, then a mask built from the top-k.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers.moe_ops import moe_reference, select_experts


def dense_moe(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """All experts on all tokens ([E, M, H]), combined with a dense [M, E] routing matrix."""
    num_experts = w13.shape[0]
    inter = w13.shape[1] // 2
    h = torch.einsum("mh,eih->emi", hidden, w13)
    act = F.silu(h[..., :inter]) * h[..., inter:]
    y = torch.einsum("emi,ehi->emh", act, w2)
    route = torch.zeros(hidden.shape[0], num_experts, dtype=hidden.dtype)
    route.scatter_add_(1, topk_ids.long(), topk_weights.to(hidden.dtype))
    return torch.einsum("me,emh->mh", route, y)


def random_moe(m: int, e: int, h: int, i: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, dtype=dtype)
    w13 = torch.randn(e, 2 * i, h, generator=g, dtype=dtype) / math.sqrt(h)
    w2 = torch.randn(e, h, i, generator=g, dtype=dtype) / math.sqrt(i)
    logits = torch.randn(m, e, generator=g, dtype=dtype)
    return hidden, w13, w2, logits


# -- select_experts ------------------------------------------------------------------------------


def test_select_experts_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[1, 2], [2, 3]]
    z0 = math.exp(1) + math.exp(3) + math.exp(2) + 1
    z1 = 2 + math.exp(5) + math.exp(1)
    expect = torch.tensor([[math.exp(3) / z0, math.exp(2) / z0], [math.exp(5) / z1, math.exp(1) / z1]])
    torch.testing.assert_close(w, expect.float())

    w, ids = select_experts(logits, 2, renormalize=True)
    assert ids.tolist() == [[1, 2], [2, 3]]
    expect = torch.tensor([[math.e / (math.e + 1), 1 / (math.e + 1)],
                           [math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)]])
    torch.testing.assert_close(w, expect.float())
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


def test_select_experts_bf16_logits_use_float32_softmax():
    logits = torch.randn(5, 16).bfloat16()
    w, ids = select_experts(logits, 4, renormalize=False)
    ref_w, ref_ids = torch.topk(torch.softmax(logits.float(), -1), 4)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_select_experts_all_experts():
    logits = torch.randn(3, 4)
    w, ids = select_experts(logits, 4, renormalize=True)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(w.sum(-1), torch.ones(3))


@pytest.mark.parametrize("top_k", [0, 5])
def test_select_experts_rejects_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        select_experts(torch.randn(2, 4), top_k, renormalize=True)


# -- moe_reference -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,e,k,h,i",
    [(1, 4, 1, 8, 6), (1, 4, 2, 8, 6), (5, 8, 2, 16, 12), (13, 6, 3, 8, 4), (9, 4, 4, 8, 6)],
)
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_matches_dense(m, e, k, h, i, renormalize):
    hidden, w13, w2, logits = random_moe(m, e, h, i, seed=m * 100 + e)
    w, ids = select_experts(logits, k, renormalize)
    out = moe_reference(hidden, w13, w2, w, ids)
    assert out.dtype == torch.float64 and out.shape == (m, h)
    torch.testing.assert_close(out, dense_moe(hidden, w13, w2, w, ids), rtol=1e-10, atol=1e-12)


def test_reference_with_idle_experts():
    # every token routed to experts {1, 3} only: experts 0, 2, 4, 5 get no tokens
    hidden, w13, w2, _ = random_moe(6, 6, 8, 4, seed=1)
    ids = torch.tensor([[1, 3], [3, 1]] * 3, dtype=torch.int32)
    w = torch.rand(6, 2, dtype=torch.float64)
    out = moe_reference(hidden, w13, w2, w, ids)
    torch.testing.assert_close(out, dense_moe(hidden, w13, w2, w, ids), rtol=1e-10, atol=1e-12)


def test_reference_single_expert_equals_mlp():
    hidden, w13, w2, _ = random_moe(3, 2, 8, 4, seed=2)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    w = torch.ones(3, 1)
    gate, up = (hidden @ w13[0].T).chunk(2, -1)
    expect = (F.silu(gate) * up) @ w2[0].T
    torch.testing.assert_close(moe_reference(hidden, w13, w2, w, ids), expect)


def test_reference_low_precision_accumulates_in_float32():
    hidden, w13, w2, logits = random_moe(7, 8, 32, 16, seed=3, dtype=torch.float32)
    w, ids = select_experts(logits, 4, renormalize=True)
    out = moe_reference(hidden.bfloat16(), w13.bfloat16(), w2.bfloat16(), w, ids)
    assert out.dtype == torch.bfloat16
    ref = dense_moe(hidden.double(), w13.double(), w2.double(), w.double(), ids)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2


def test_reference_empty_batch():
    hidden, w13, w2, _ = random_moe(0, 4, 8, 4)
    out = moe_reference(hidden, w13, w2, torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int32))
    assert out.shape == (0, 8)


@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1024, 8192])
def test_moe_tiles_fit_shared_memory_in_every_dtype(num_tokens):
    """The tiles were tuned for bf16; fp32 needs twice the room, and on the GPU an oversized tile fails to launch."""
    pytest.importorskip("triton")
    from nanovllm.kernels.fused_moe import fit_shared_memory, pick_config

    hopper = 227 * 1024
    tuned = pick_config(num_tokens, 128, 8)
    assert fit_shared_memory(tuned, 2, hopper) == tuned  # bf16 keeps the measured tiles
    for element_size in (2, 4):
        cfg = fit_shared_memory(tuned, element_size, hopper)
        staged = (cfg.block_m * cfg.block_k + 2 * cfg.block_k * cfg.block_n) * element_size * cfg.num_stages
        assert staged <= hopper and cfg.num_stages >= 2 and cfg.block_k >= 16
        # FP8 experts keep one K step per 128-column scale block: N and M shrink instead
        fp8 = fit_shared_memory(dataclasses.replace(tuned, block_k=128), element_size, hopper, fixed_block_k=True)
        staged = (fp8.block_m * fp8.block_k + 2 * fp8.block_k * fp8.block_n) * element_size * fp8.num_stages
        assert staged <= hopper and fp8.block_k == 128
    # a smaller device (A100: 163 KiB) shrinks even bf16 tiles
    small = fit_shared_memory(tuned, 2, 163 * 1024)
    assert (small.block_m * small.block_k + 2 * small.block_k * small.block_n) * 2 * small.num_stages <= 163 * 1024
