"""Sampling: the sampler on hand-made logits, then seeds, stop strings, stop tokens and min_tokens in the engine."""
from __future__ import annotations


import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.layers import sampler as sampler_module
from nanovllm.layers.sampler import Sampler, SamplingBatch

# ---- the sampler on hand-made logits -------------------------------------------------------------------------


def engine_keys(seeds: list[int], steps: list[int]) -> torch.Tensor:
    """Row keys as the engine derives them from (request seed, output index)."""
    return sampler_module.row_keys(torch.tensor(seeds, dtype=torch.int64), torch.tensor(steps, dtype=torch.int64))


def keys_for(n: int, seed: int = 1234) -> torch.Tensor:
    """One seed, consecutive output positions."""
    return engine_keys([seed] * n, list(range(n)))


def make_batch(
    n: int,
    vocab: int,
    temperature: float | list[float] = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    keys: torch.Tensor | None = None,
    banned: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SamplingBatch:
    temps = torch.tensor(temperature if isinstance(temperature, list) else [temperature] * n, dtype=torch.float32)
    k = vocab if top_k is None else top_k
    return SamplingBatch(
        temperatures=temps,
        top_ks=torch.full((n,), k, dtype=torch.int64),
        top_ps=torch.full((n,), top_p, dtype=torch.float32),
        min_ps=torch.full((n,), min_p, dtype=torch.float32),
        keys=keys_for(n) if keys is None else keys,
        all_greedy=bool((temps == 0).all()),
        use_top_k_top_p=k < vocab or top_p < 1.0,
        use_min_p=min_p > 0,
        banned=banned,
    )


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    out = Sampler()(logits, batch)
    return getattr(out, "token_ids", out)  # a SamplerOutput, or the token tensor itself


def repeated(probs: list[float], n: int) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().repeat(n, 1)


def counts(tokens: torch.Tensor, vocab: int) -> list[int]:
    return torch.bincount(tokens, minlength=vocab).tolist()


def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, make_batch(64, 100, temperature=0.0)), logits.argmax(-1))
    # greedy rows mixed with sampled rows keep their argmax
    temps = [0.0 if i % 2 == 0 else 1.0 for i in range(64)]
    tokens = sample(logits, make_batch(64, 100, temperature=temps))
    assert torch.equal(tokens[::2], logits.argmax(-1)[::2])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature):
    logits = torch.randn(256, 100, generator=torch.Generator().manual_seed(1))
    tokens = sample(logits, make_batch(256, 100, temperature=temperature, top_k=1))
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_never_samples_outside_the_top_k():
    n, vocab, k = 4000, 30, 5
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(2)) * 0.5  # flat: tail is likely
    tokens = sample(logits, make_batch(n, vocab, temperature=1.0, top_k=k))
    top = logits.topk(k, dim=-1).indices
    assert (top == tokens.unsqueeze(1)).any(dim=1).all()
    # and every one of the top k is reachable: one row of logits, many keys
    row = repeated([1.0 / vocab] * vocab, n) + torch.linspace(0, 0.5, vocab)
    tokens = sample(row, make_batch(n, vocab, temperature=1.0, top_k=k))
    assert set(tokens.tolist()) == set(range(vocab - k, vocab))


@pytest.mark.parametrize(
    "top_p, kept", [(0.4, {0}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 4000
    tokens = sample(repeated(probs, n), make_batch(n, 4, temperature=1.0, top_p=top_p))
    assert set(tokens.tolist()) == kept
    # within the kept set, frequencies follow the renormalised probabilities
    mass = sum(probs[t] for t in kept)
    freq = counts(tokens, 4)
    for t in kept:
        assert abs(freq[t] / n - probs[t] / mass) < 0.03


@pytest.mark.parametrize("min_p, kept", [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0})])
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]  # thresholds: 0.025, 0.1, 0.25, 0.35
    n = 4000
    tokens = sample(repeated(probs, n), make_batch(n, 4, temperature=1.0, min_p=min_p))
    assert set(tokens.tolist()) == kept


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_frequencies_follow_softmax(temperature):
    """Many independent samples (one key each, as consecutive output positions of one seed): chi-square test."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    n = 20000
    tokens = sample(logits.repeat(n, 1), make_batch(n, 6, temperature=temperature))
    expected = (logits / temperature).softmax(-1) * n
    observed = torch.tensor(counts(tokens, 6), dtype=torch.float32)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, f"chi-square {chi2:.1f} with 5 degrees of freedom (p < 1e-4 would be > 25.7)"


def test_keys_from_different_seeds_are_independent():
    """Position 0 of 20000 different seeds: also distributed as softmax."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 20000
    keys = engine_keys(list(range(n)), [0] * n)
    tokens = sample(logits.repeat(n, 1), make_batch(n, 4, keys=keys))
    expected = logits.softmax(-1) * n
    observed = torch.tensor(counts(tokens, 4), dtype=torch.float32)
    assert float(((observed - expected) ** 2 / expected).sum()) < 22.0


def test_banned_tokens_are_never_sampled():
    n, vocab = 2000, 8
    logits = torch.zeros(n, vocab)
    logits[:, 3] = 5.0  # by far the most likely
    logits[:, 5] = 2.0
    rows = torch.arange(n).repeat_interleave(2)
    tokens_banned = torch.tensor([3, 5]).repeat(n)
    for temperature in (0.0, 1.0):
        tokens = sample(logits, make_batch(n, vocab, temperature=temperature, banned=(rows, tokens_banned)))
        assert not ({3, 5} & set(tokens.tolist()))
    # banned in some rows only: the others still pick token 3 greedily
    tokens = sample(logits, make_batch(n, vocab, temperature=0.0, banned=(torch.tensor([0]), torch.tensor([3]))))
    assert tokens[0] != 3 and (tokens[1:] == 3).all()


def test_a_rows_sample_does_not_depend_on_its_batch():
    vocab = 50
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, vocab, generator=gen)
    keys = keys_for(8, seed=99)
    together = sample(logits, make_batch(8, vocab, temperature=0.9, keys=keys))
    for i in range(8):
        alone = sample(logits[i : i + 1], make_batch(1, vocab, temperature=0.9, keys=keys[i : i + 1]))
        assert alone.item() == together[i].item()
    # and not on what the other rows ask for
    temps = [0.9 if i == 2 else 0.0 for i in range(8)]
    mixed = sample(logits, make_batch(8, vocab, temperature=temps, keys=keys))
    assert mixed[2] == together[2]


# ---- in the engine -------------------------------------------------------------------------------------------

PROMPTS = [
    "The quick brown fox",
    [5, 17, 300, 42, 99, 7, 250, 3, 64, 128, 11, 400, 23],
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=128)


@pytest.fixture(scope="module")
def chunked_llm(qwen3_dir):
    """Tiny token budget and pages: prompts are chunked, batches mixed, requests preempted."""
    return LLM(
        qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=5,
        enable_prefix_caching=False,
    )


@pytest.fixture(scope="module")
def overlap_llm(qwen3_dir):
    """Overlap scheduling: results come back one step late."""
    return LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=128, async_scheduling=True)


@pytest.fixture(params=["sync", "overlap"])
def any_llm(request, llm, overlap_llm):
    return llm if request.param == "sync" else overlap_llm


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    first = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    second = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    assert first == second
    # the same prompt alone, and in another batch at another position
    alone = tokens(llm.generate([PROMPTS[1]], params, use_tqdm=False))
    assert alone[0] == first[1]
    other = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=4)
    mixed = llm.generate([PROMPTS[2], "Hello, world!", PROMPTS[1]], [other, other, params], use_tqdm=False)
    assert mixed[2].token_ids == first[1]


def test_seeded_sampling_survives_chunking_and_preemption(llm, chunked_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
    expected = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    assert tokens(chunked_llm.generate(PROMPTS, params, use_tqdm=False)) == expected
    assert chunked_llm.engine.core.scheduler.num_preemptions > 0


def test_seeded_sampling_with_overlap_scheduling(llm, overlap_llm):
    params = SamplingParams(temperature=1.0, min_p=0.05, seed=13, max_tokens=8, ignore_eos=True)
    assert tokens(overlap_llm.generate(PROMPTS, params, use_tqdm=False)) == tokens(
        llm.generate(PROMPTS, params, use_tqdm=False)
    )


def test_different_seeds_differ(llm):
    outs = [
        llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=s, max_tokens=10, ignore_eos=True),
                     use_tqdm=False)[0].token_ids
        for s in range(4)
    ]
    assert len({tuple(o) for o in outs}) == 4
    # and unseeded requests differ from each other too
    unseeded = llm.generate([PROMPTS[0]] * 4, SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)
    assert len({tuple(o.token_ids) for o in unseeded}) > 1


def test_n_samples_with_a_seed_differ_and_reproduce(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    first = [c.token_ids for c in llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs]
    second = [c.token_ids for c in llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs]
    assert first == second
    assert len({tuple(t) for t in first}) == 3


def _ascii_stop(text: str) -> tuple[str, int] | None:
    """A 2-character printable ASCII stop string whose first occurrence is at index >= 1."""
    for k in range(1, len(text) - 1):
        candidate = text[k : k + 2]
        if candidate.isascii() and candidate.isprintable() and text.find(candidate) == k:
            return candidate, k
    return None


def test_stop_strings_cut_the_text(any_llm):
    llm = any_llm
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    checked = 0
    for prompt in PROMPTS:
        base = llm.generate(prompt, greedy, use_tqdm=False)[0]
        found = _ascii_stop(base.text)
        if found is None:
            continue
        stop, index = found
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop, "\x00never"])
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert out.finish_reason == "stop"
        assert out.outputs[0].stop_reason == stop
        assert out.text == base.text[:index]
        assert stop not in out.text
        assert out.token_ids == base.token_ids[: len(out.token_ids)]
        assert len(out.token_ids) < len(base.token_ids) or index + len(stop) >= len(base.text)
        checked += 1
    assert checked >= 2, "the greedy outputs should offer ASCII stop strings"


def test_stop_token_ids_end_the_request(any_llm):
    llm = any_llm
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = llm.generate(PROMPTS[1], greedy, use_tqdm=False)[0].token_ids
    index = 3
    stop_token = base[index]
    first = base.index(stop_token)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  stop_token_ids=[stop_token]), use_tqdm=False)[0]
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_token


def test_min_tokens_prevents_early_stop(any_llm):
    llm = any_llm
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = llm.generate(PROMPTS[1], greedy, use_tqdm=False)[0].token_ids
    stop_token = base[0]  # greedy would stop at once
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token],
                            min_tokens=4)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    assert len(out.token_ids) >= 4
    assert stop_token not in out.token_ids[:4], "the stop token is masked until min_tokens"
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop_token and stop_token not in out.token_ids[:-1]
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 12
    # without min_tokens the same request stops after one token
    early = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    stop_token_ids=[stop_token]), use_tqdm=False)[0]
    assert early.token_ids == [stop_token] and early.finish_reason == "stop"


def test_uniform_noise_stays_strictly_inside_the_unit_interval():
    """The extreme bit patterns: a uniform of exactly 1.0 (or 0.0) gives infinite Gumbel noise, and that token
    would win whatever its logit."""
    from nanovllm.layers.sampler import uniform_from_bits

    bits = torch.tensor([0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFFFF], dtype=torch.int64)
    u = uniform_from_bits(bits)
    assert bool(((u > 0) & (u < 1)).all()), u
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
