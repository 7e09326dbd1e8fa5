"""Triton attention kernels against a naive float64 reference written here.

Runs on CUDA when present; otherwise on CPU tensors under Triton's interpreter when TRITON_INTERPRET=1
(smaller shapes, no 3000-token contexts); otherwise skips. Page tables are random permutations, the
cache is random (so reading a wrong slot shows), and outputs/workspaces start as NaN (so an unwritten
element shows).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from gpu import kernel_device, kernel_test_marks

pytest.importorskip("triton")

from nanovllm.kernels.kv_write import store_kv  # noqa: E402
from nanovllm.kernels.paged_decode import alloc_decode_workspace, paged_decode  # noqa: E402
from nanovllm.kernels.paged_prefill import paged_prefill  # noqa: E402
from nanovllm.layers.attention.metadata import AttentionMetadata  # noqa: E402
from nanovllm.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = kernel_device()
SMALL = DEVICE is None or DEVICE.type != "cuda"  # the interpreter is slow: smaller cases
pytestmark = kernel_test_marks(DEVICE)

# bf16 keeps 8 mantissa bits: the kernel rounds P to bf16 before P@V and the output to bf16, each
# ~2^-9 relative, so a few 1e-3 of norm-wise error is expected (seen: 3e-3..5e-3). fp16 has 3 more
# bits (seen: ~2e-4), so 1e-3 leaves 4x headroom. Checked per request too, so one bad row shows.
RTOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
DTYPES = [torch.bfloat16, torch.float16]
NUM_KV_HEADS = 2
LONG = 3000


def cases(axes: list[list], variants: list[tuple]) -> list:
    """Every combination of ``axes`` with every variant on a GPU; under the interpreter (slow) one
    variant per combination, rotated so the variants spread over the combinations."""
    out = []
    for combo in itertools.product(*[list(enumerate(a)) for a in axes]):
        idx, vals = zip(*combo)
        picked = variants if not SMALL else [variants[sum(idx) % len(variants)]]
        for v in picked:
            params = tuple(vals) + tuple(v)
            out.append(pytest.param(*params, id="-".join(str(x).replace("torch.", "") for x in params)))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def check_close(out: torch.Tensor, ref: torch.Tensor, q_lens: list[int], dtype: torch.dtype) -> None:
    """Norm-wise relative error, for the batch and for each request (one bad row must not hide)."""
    assert not out.isnan().any(), "unwritten or NaN output"
    assert rel_err(out, ref) < RTOL[dtype]
    start = 0
    for i, n in enumerate(q_lens):
        err = rel_err(out[start:start + n], ref[start:start + n])
        assert err < RTOL[dtype], f"request {i}: relative error {err:.2e}"
        start += n


def make_paged_kv(seq_lens: list[int], page: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator,
                  num_kv_heads: int = NUM_KV_HEADS):
    """Random caches and a block table whose pages are a random permutation (plus spare pages)."""
    pages_per_seq = [math.ceil(s / page) for s in seq_lens]
    num_blocks = sum(pages_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(max(pages_per_seq), 1) + 1
    # unused entries point at random real pages: reading past a sequence's end gives wrong numbers
    table = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen)
    used = 0
    for i, n in enumerate(pages_per_seq):
        table[i, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, page, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    return k_cache, v_cache, table.to(torch.int32)


def gather_kv(cache: torch.Tensor, table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    page = cache.shape[1]
    pages = table_row[: math.ceil(seq_len / page)].long().cpu()
    return cache.cpu()[pages].reshape(-1, *cache.shape[2:])[:seq_len].double()


def reference_attention(q, k_cache, v_cache, table, seq_lens, q_lens, scale) -> torch.Tensor:
    """Dense float64 softmax attention per request; query row j sits at position seq_len - q_len + j."""
    q = q.double().cpu()
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    start = 0
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        k = gather_kv(k_cache, table[i], seq_len).repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, table[i], seq_len).repeat_interleave(group, dim=1)
        qi = q[start:start + q_len]
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += q_len
    return out


def to_dev(*ts):
    return [t.to(DEVICE) for t in ts]


def decode_lens(page: int) -> list[int]:
    lens = [1, page - 1, page, page + 1, 5 * page + 3, 77]
    return lens + ([LONG, 2 * page] if not SMALL else [])


# ---------------------------------------------------------------- KV write


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim,num_kv_heads,page", [(64, 1, 8), (128, 2, 16), (128, 3, 32)])
def test_store_kv(dtype, head_dim, num_kv_heads, page):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 6, 40
    slots = torch.randperm(num_blocks * page, generator=gen)[:num_tokens]
    slots[::7] = -1  # padding rows
    # k and v as strided views into one fused qkv tensor, the way a model hands them over
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(dtype)
    k, v = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    shape = (num_blocks, page, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page] = k[t]
            want_v[s // page, s % page] = v[t]

    k_d, v_d, kc_d, vc_d, slots_d = to_dev(k, v, k_cache, v_cache, slots)
    store_kv(k_d, v_d, kc_d, vc_d, slots_d)
    # a copy: bit-exact, and slots of -1 rows (and all others) untouched
    assert torch.equal(kc_d.cpu(), want_k)
    assert torch.equal(vc_d.cpu(), want_v)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize(
    "dtype,head_dim,group,page,num_splits",
    cases([DTYPES, [64, 128], [1, 2, 4, 8]], [(16, 1), (16, 5), (8, 3), (32, 8)]),
)
def test_paged_decode(dtype, head_dim, group, page, num_splits):
    gen = torch.Generator().manual_seed(1000 * group + head_dim + page + num_splits)
    seq_lens = decode_lens(page)
    batch, num_heads = len(seq_lens), NUM_KV_HEADS * group
    k_cache, v_cache, table = make_paged_kv(seq_lens, page, head_dim, dtype, gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    ref = reference_attention(q, k_cache, v_cache, table, seq_lens, [1] * batch, scale)

    q_d, kc_d, vc_d, table_d = to_dev(q, k_cache, v_cache, table)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q_d, float("nan"))
    # a workspace larger than needed, poisoned: empty splits must not leak NaN into the merge
    ws = alloc_decode_workspace(batch + 2, num_heads, head_dim, num_splits + 1, DEVICE)
    for w in ws:
        w.fill_(float("nan"))
    paged_decode(q_d, kc_d, vc_d, table_d, lens_d, scale, num_splits=num_splits, workspace=ws, out=out,
                 block_n=max(32, page))
    check_close(out, ref, [1] * batch, dtype)


def test_paged_decode_zero_length_rows():
    """seq_len 0 (CUDA-graph padding rows) yields zeros, not NaN, and leaves other rows right."""
    gen = torch.Generator().manual_seed(7)
    seq_lens, page, head_dim = [0, 20, 0, 1], 16, 64
    k_cache, v_cache, table = make_paged_kv(seq_lens, page, head_dim, torch.float16, gen)
    q = torch.randn(4, 4, head_dim, generator=gen).to(torch.float16)
    q_d, kc_d, vc_d, table_d = to_dev(q, k_cache, v_cache, table)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for splits in (1, 4):
        out = paged_decode(q_d, kc_d, vc_d, table_d, lens_d, 0.125, num_splits=splits).cpu()
        assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
        ref = reference_attention(q[[1, 3]], k_cache, v_cache, table[[1, 3]], [20, 1], [1, 1], 0.125)
        assert rel_err(out[[1, 3]], ref) < RTOL[torch.float16]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_start_order_does_not_change_the_output(num_splits):
    """``order`` only changes which programs start first: any permutation gives the same bits."""
    gen = torch.Generator().manual_seed(11 + num_splits)
    page, head_dim, group = 16, 64, 2
    seq_lens = decode_lens(page)
    k_cache, v_cache, table = make_paged_kv(seq_lens, page, head_dim, torch.bfloat16, gen)
    q = torch.randn(len(seq_lens), NUM_KV_HEADS * group, head_dim, generator=gen).to(torch.bfloat16)
    q_d, kc_d, vc_d, table_d = to_dev(q, k_cache, v_cache, table)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    plain = paged_decode(q_d, kc_d, vc_d, table_d, lens_d, 0.125, num_splits=num_splits)
    longest_first = torch.argsort(lens_d, descending=True, stable=True).to(torch.int32)
    shuffled = torch.randperm(len(seq_lens), generator=gen).to(device=DEVICE, dtype=torch.int32)
    for order in (longest_first, shuffled):
        out = paged_decode(q_d, kc_d, vc_d, table_d, lens_d, 0.125, num_splits=num_splits, order=order)
        assert torch.equal(out, plain)
    ref = reference_attention(q, k_cache, v_cache, table, seq_lens, [1] * len(seq_lens), 0.125)
    check_close(plain, ref, [1] * len(seq_lens), torch.bfloat16)


def test_split_counts_are_few_powers_of_two():
    """Each split count is a kernel variant that eager decode compiles up front, so there must be few; fewer
    sequences get more splits, and a batch that fills the SMs on its own gets none."""
    backend = TritonAttentionBackend(16, 8, 64, max_num_seqs=512, device=DEVICE)
    counts = [backend.num_splits_for(batch) for batch in range(1, 513)]
    assert all(c & (c - 1) == 0 and 1 <= c <= backend.max_num_splits for c in counts)
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > 1 and counts[-1] == 1
    assert len(set(counts)) <= 5


# ---------------------------------------------------------------- prefill / extend / mixed


def mixed_batch(page: int) -> tuple[list[int], list[int]]:
    """(context already cached, new tokens) per request: fresh prompts, prefix-hit extends, decodes."""
    reqs = [
        (0, 1),               # one-token prompt
        (0, page - 1), (0, page), (0, page + 1),   # fresh prompts around a page boundary
        (page + 1, 37),       # prefix hit that ends mid-page, then a chunk
        (3 * page, page),     # chunk starting on a page boundary
        (page - 1, 1), (page, 1), (5, 1),          # decodes in the same launch
        (2, 70),              # chunk longer than a query block
    ]
    if not SMALL:
        reqs += [(0, 300), (LONG - 500, 500), (LONG - 1, 1)]
    ctx, qlen = zip(*reqs)
    return [c + n for c, n in zip(ctx, qlen)], list(qlen)


@pytest.mark.parametrize(
    "head_dim,group,dtype,page,block_m,block_n",
    cases([[64, 128], [1, 2, 4, 8]], [(dt, *blocks) for dt in DTYPES for blocks in [(16, 64, 32), (8, 32, 64)]]),
)
def test_paged_prefill_mixed(head_dim, group, dtype, page, block_m, block_n):
    gen = torch.Generator().manual_seed(100 * group + head_dim + page)
    seq_lens, q_lens = mixed_batch(page)
    num_heads, num_tokens = NUM_KV_HEADS * group, sum(q_lens)
    k_cache, v_cache, table = make_paged_kv(seq_lens, page, head_dim, dtype, gen)
    pad = 3  # rows past the last request, as CUDA-graph padding leaves them
    q = torch.randn(num_tokens + pad, num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    ref = reference_attention(q[:num_tokens], k_cache, v_cache, table, seq_lens, q_lens, scale)

    q_d, kc_d, vc_d, table_d = to_dev(q, k_cache, v_cache, table)
    lens_d = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    out = torch.full_like(q_d, float("nan"))
    paged_prefill(q_d, kc_d, vc_d, table_d, lens_d, qsl, scale, out=out, block_m=block_m, block_n=block_n)
    assert out[num_tokens:].isnan().all(), "padding rows must be left alone"
    check_close(out[:num_tokens], ref, q_lens, dtype)


# ---------------------------------------------------------------- backend (write + attend)


def run_backend_step(seq_lens, q_lens, page, head_dim, group, dtype, gen):
    """One backend forward over fresh K/V for the new tokens; returns (out, ref, caches, expected caches)."""
    num_heads, num_tokens = NUM_KV_HEADS * group, sum(q_lens)
    k_cache, v_cache, table = make_paged_kv(seq_lens, page, head_dim, dtype, gen)
    slots = []
    for i, (s, n) in enumerate(zip(seq_lens, q_lens)):
        slots += [int(table[i, p // page]) * page + p % page for p in range(s - n, s)]
    slots = torch.tensor(slots + [-1, -1])  # two padding rows
    q = torch.randn(num_tokens + 2, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens + 2, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens + 2, NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page], want_v[s // page, s % page] = k[t], v[t]
    scale = head_dim ** -0.5
    ref = reference_attention(q[:num_tokens], want_k, want_v, table, seq_lens, q_lens, scale)

    q_d, k_d, v_d, kc_d, vc_d, table_d, slots_d = to_dev(q, k, v, k_cache, v_cache, table, slots)
    meta = AttentionMetadata(
        slot_mapping=slots_d,
        query_start_loc=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=table_d, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(seq_lens),
    )
    backend = TritonAttentionBackend(num_heads, NUM_KV_HEADS, head_dim, max_num_seqs=8, device=DEVICE)
    if meta.is_decode_only:  # decode rows are one per sequence: drop the padding rows
        q_d, k_d, v_d, meta.slot_mapping = q_d[:num_tokens], k_d[:num_tokens], v_d[:num_tokens], slots_d[:num_tokens]
        meta.decode_order = torch.argsort(meta.seq_lens, descending=True, stable=True).to(torch.int32)
    backend.prepare(meta)
    out = backend.forward(q_d, k_d, v_d, kc_d, vc_d, meta, scale)
    return out[:num_tokens], ref, (kc_d, vc_d), (want_k, want_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("decode_only", [True, False])
def test_backend_forward(dtype, decode_only):
    gen = torch.Generator().manual_seed(3 + decode_only)
    page, head_dim, group = 16, 128, 2
    if decode_only:
        seq_lens, q_lens = [1, 15, 16, 17, 90] + ([LONG] if not SMALL else []), None
        q_lens = [1] * len(seq_lens)
    else:
        seq_lens, q_lens = mixed_batch(page)
    out, ref, caches, wants = run_backend_step(seq_lens, q_lens, page, head_dim, group, dtype, gen)
    for got, want in zip(caches, wants):
        assert torch.equal(got.cpu(), want), "KV write put a token in the wrong slot"
    check_close(out, ref, q_lens, dtype)
