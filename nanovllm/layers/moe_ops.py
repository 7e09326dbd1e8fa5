"""Mixture-of-experts routing and the torch reference expert computation.

``select_experts`` turns router logits into the top-k (weight, expert) pairs of each token, the way
Qwen2-MoE / Qwen3-MoE route (softmax over all experts first, then top-k, optionally renormalised:
``norm_topk_prob``). ``moe_reference`` runs the experts with plain torch ops. It is the CPU path and
the oracle the Triton kernel (``nanovllm.kernels.fused_moe``) is tested against, so it favours
clarity over speed: one host sync to learn how many tokens each expert got, then a loop over experts.

Weight layout shared with the fused kernel (one stacked tensor per projection, as the loader packs it):
  w13 ``[E, 2*I, H]``: rows ``[:I]`` are the gate projection, rows ``[I:]`` the up projection;
  w2  ``[E, H, I]``:   the down projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to ``top_k`` experts.

    Args:
        router_logits: ``[M, E]`` gate outputs, any float dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        renormalize: rescale the k kept probabilities to sum to 1 (``norm_topk_prob``).

    Returns:
        ``topk_weights [M, top_k]`` float32 and ``topk_ids [M, top_k]`` int32, highest weight first.
    """
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    # float32 softmax: bf16 logits would round near-tied probabilities together
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])`` with SwiGLU experts.

    Args:
        hidden: ``[M, H]`` token activations.
        w13: ``[E, 2*I, H]`` stacked gate/up projections.
        w2: ``[E, H, I]`` down projections.
        topk_weights: ``[M, k]`` routing weights (any float dtype).
        topk_ids: ``[M, k]`` expert index of each weight (any integer dtype).

    Returns:
        ``[M, H]`` in ``hidden.dtype``. Expert matmuls run in ``hidden.dtype``; the weighted sum over
        the k experts accumulates in float32 (float64 when ``hidden`` is float64).
    """
    num_tokens, hidden_size = hidden.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_tokens, hidden_size, dtype=acc_dtype, device=hidden.device)
    if num_tokens == 0:
        return out.to(hidden.dtype)

    # Group the M*k (token, slot) pairs by expert: a stable sort keeps tokens in order within an
    # expert, and one .tolist() (the only host sync) says where each expert's group ends.
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.sort(flat_ids, stable=True).indices
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    flat_weights = topk_weights.reshape(-1)

    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // top_k
        x = hidden[tokens]
        gate, up = (x @ w13[expert].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[expert].T
        out.index_add_(0, tokens, y.to(acc_dtype) * flat_weights[pairs].to(acc_dtype)[:, None])
    return out.to(hidden.dtype)


def moe_reference_fp8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The fused kernel's FP8 arithmetic (block-scaled experts) in float64, the oracle of its FP8 path.

    Each expert's input rows are quantized per token and 128-column group and multiplied by the dequantized
    ``w13``; the SwiGLU output is rounded to ``hidden.dtype`` (the kernel's intermediate buffer), quantized the
    same way and multiplied by the dequantized ``w2``. Returns ``[M, H]`` float64.
    """
    from nanovllm.layers.quantization.fp8_formats import dequantize, quantize_tokens

    def quantized(x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_tokens(x, 128)
        return q.double() * scale.double().repeat_interleave(128, dim=1)[:, :x.shape[1]]

    w13_64 = dequantize(w13, w13_scale, (128, 128), torch.float64)
    w2_64 = dequantize(w2, w2_scale, (128, 128), torch.float64)
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()
    flat_weights = topk_weights.reshape(-1).double()
    for expert in flat_ids.unique().tolist():  # rows are quantized one by one, so an expert's rows go together
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        gate, up = (quantized(hidden[tokens]) @ w13_64[expert].T).chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(hidden.dtype)
        out.index_add_(0, tokens, (quantized(act) @ w2_64[expert].T) * flat_weights[pairs, None])
    return out
