"""logit_bias, allowed_token_ids and bad_words: the sampler on hand-made logits, the host arrays a step ships, and
the engine against a plain step-by-step reference decode with Hugging Face transformers on the same checkpoint."""
from __future__ import annotations

import pickle
from typing import Any, Callable

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.batch_builder import build_host_batch
from nanovllm.engine.input_processor import InputProcessor
from nanovllm.engine.request import PLACEHOLDER, Request
from nanovllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from nanovllm.layers import sampler as sampler_module
from nanovllm.layers.sampler import ConditionalBans, Penalties, Sampler, SamplingBatch
from nanovllm.sampling_params import MAX_BAD_WORDS, MAX_BAD_WORDS_CHARS, MAX_LOGIT_BIAS

# ---- the sampler on hand-made logits -----------------------------------------------------------------------------


def make_batch(n: int, vocab: int, temperature: float | list[float] = 1.0, seed: int = 1234, **controls: Any):
    temps = torch.tensor(temperature if isinstance(temperature, list) else [temperature] * n, dtype=torch.float32)
    keys = sampler_module.row_keys(torch.full((n,), seed, dtype=torch.int64), torch.arange(n, dtype=torch.int64))
    return SamplingBatch(
        temperatures=temps, top_ks=torch.full((n,), vocab, dtype=torch.int64), top_ps=torch.ones(n),
        min_ps=torch.zeros(n), keys=keys, all_greedy=bool((temps == 0).all()), use_top_k_top_p=False,
        use_min_p=False, **controls,
    )


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    return Sampler()(logits, batch).token_ids


def long(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * tokens.numel()
    observed = torch.bincount(tokens, minlength=probs.numel()).float()
    support = expected > 0
    assert observed[~support].sum() == 0, "a token of probability 0 was sampled"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


def test_logit_bias_moves_greedy_rows_and_only_the_rows_it_names():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    # rows 1 and 4: +100 on token 7; row 2: -100 on its own argmax
    argmax2 = int(logits[2].argmax())
    bias = (long([1, 4, 2]), long([7, 7, argmax2]), torch.tensor([100.0, 100.0, -100.0]))
    tokens = sample(logits, make_batch(6, 40, temperature=0.0, logit_bias=bias))
    expected = logits.clone()
    expected[1, 7] += 100
    expected[4, 7] += 100
    expected[2, argmax2] -= 100
    assert tokens.tolist() == expected.argmax(-1).tolist()
    assert tokens[1] == 7 and tokens[4] == 7 and tokens[2] != argmax2
    # greedy rows among sampled rows see it too
    tokens = sample(logits, make_batch(6, 40, temperature=[0.0, 0.0, 1.0, 1.0, 0.0, 1.0], logit_bias=bias))
    assert tokens[1] == 7 and tokens[4] == 7


def test_logit_bias_shifts_the_sampled_distribution():
    n = 20000
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.2])
    bias_tokens, bias_values = [1, 2], [1.5, -2.0]
    rows = torch.arange(n).repeat_interleave(2)
    bias = (rows, long(bias_tokens).repeat(n), torch.tensor(bias_values).repeat(n))
    tokens = sample(logits.repeat(n, 1), make_batch(n, 5, temperature=0.8, logit_bias=bias))
    reference = logits.clone()
    reference[bias_tokens] += torch.tensor(bias_values)
    assert chi_square(tokens, (reference / 0.8).softmax(-1)) < 23.0  # 4 degrees of freedom, p < 1e-4 beyond 23.5


def test_logit_bias_comes_after_penalties_and_logprobs_stay_the_models():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    penalties = Penalties(presence=torch.zeros(1), frequency=torch.zeros(1), repetition=torch.tensor([2.0]),
                          output_counts=torch.zeros(1, 4), seen=torch.tensor([[True, False, False, True]]))
    # the penalty halves token 0 to 1.5; a bias b after it wins over token 1 (2.0) when b > 0.5, while a bias
    # before it would need (3 + b) / 2 > 2, b > 1: 0.8 tells the two orders apart
    for bias, winner in ((0.3, 1), (0.8, 0)):
        batch = make_batch(1, 4, temperature=0.0, logit_bias=(long([0]), long([0]), torch.tensor([bias])))
        batch.penalties, batch.num_logprobs = penalties, 2
        out = Sampler()(logits, batch)
        assert out.token_ids.item() == winner, bias
        # logprobs: the model's own distribution, neither penalised nor biased
        raw = logits.log_softmax(-1)
        assert torch.allclose(out.logprobs[0], raw[0, [winner, 0, 1]])
        assert out.logprob_ids[0].tolist() == [winner, 0, 1]


def test_allowed_token_ids_restrict_only_their_rows():
    n, vocab = 4000, 12
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 0.3
    allowed = [2, 5, 11]
    restricted = torch.arange(0, n, 2)  # every other row
    rows = restricted.repeat_interleave(len(allowed))
    tokens_allowed = long(allowed).repeat(len(restricted))
    for temperature in (0.0, 1.0):
        tokens = sample(logits, make_batch(n, vocab, temperature=temperature,
                                           allowed=(restricted, rows, tokens_allowed)))
        assert set(tokens[::2].tolist()) == set(allowed)  # each reachable, nothing else
        # the other rows sample exactly what they would without the restricted rows' control
        assert torch.equal(tokens[1::2], sample(logits, make_batch(n, vocab, temperature=temperature))[1::2])
        if temperature == 0.0:
            assert torch.equal(tokens[::2], long(allowed)[logits[::2, allowed].argmax(-1)])


def test_allowed_token_ids_sample_the_renormalised_distribution():
    n = 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    allowed = [1, 3, 4]
    rows = torch.arange(n).repeat_interleave(len(allowed))
    batch = make_batch(n, 6, allowed=(torch.arange(n), rows, long(allowed).repeat(n)))
    tokens = sample(logits.repeat(n, 1), batch)
    probs = torch.zeros(6)
    probs[allowed] = logits[allowed].softmax(-1)
    assert chi_square(tokens, probs) < 18.4  # 2 degrees of freedom: p < 1e-4 beyond 18.4


def test_conditional_bans_read_the_input_token_when_sampling():
    """A ban that depends on the row's newest token, which the forward writes into input_ids after the batch was
    built: the sampler must read it then."""
    vocab = 10
    logits = torch.zeros(4, vocab)
    logits[:, 6] = 5.0  # every row's greedy choice
    input_ids = torch.full((7,), PLACEHOLDER, dtype=torch.int64)  # rows' last tokens at 1, 3, 5, 6
    bans = ConditionalBans(rows=long([0, 1, 2, 2, 3, 3]), tokens=long([6, 6, 6, 6, 6, 6]),
                           after=long([4, 4, 8, 4, 1, 2]), input_ids=input_ids, inputs=long([1, 3, 5, 5, 6, 6]))
    batch = make_batch(4, vocab, temperature=0.0, conditional_bans=bans)
    input_ids[torch.tensor([1, 3, 5, 6])] = long([4, 9, 4, 2])  # "the forward fills in the pending tokens"
    tokens = sample(logits, batch)
    # row 0: after 4, banned; row 1: 9 is not 4; row 2: two words end in 6, one after 8 and one after 4 (it is 4);
    # row 3: words after 1 and after 2, the token is 2
    assert tokens.tolist() == [0, 6, 0, 0]
    input_ids[torch.tensor([1, 3, 5, 6])] = long([3, 4, 8, 3])
    assert sample(logits, batch).tolist() == [6, 0, 0, 6]


def test_bans_never_leave_a_restricted_row_without_its_allowed_tokens():
    """If the bans cover every allowed token of a row, the row still samples an allowed token (rather than
    whatever argmax makes of a row of -inf); other rows keep their bans."""
    vocab = 8
    logits = torch.zeros(3, vocab)
    logits[:, 1] = 3.0
    logits[:, 4] = 1.0
    allowed = (long([0, 1]), long([0, 0, 1, 1]), long([1, 4, 1, 4]))
    banned = (long([0, 0, 1, 2]), long([1, 4, 1, 1]))  # row 0: both allowed tokens; row 1: one; row 2: free
    for temperature in (0.0, 1.0):
        tokens = sample(logits, make_batch(3, vocab, temperature=temperature, allowed=allowed, banned=banned))
        assert tokens[0].item() in (1, 4)
        assert tokens[1].item() == 4
        assert tokens[2].item() != 1
    assert sample(logits, make_batch(3, vocab, temperature=0.0, allowed=allowed, banned=banned))[0] == 1


def test_controls_do_not_write_into_the_logits():
    """The logits may be a CUDA graph's output buffer, read again by nothing, but never to be written."""
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    batch = make_batch(2, 10, temperature=0.0, logit_bias=(long([0]), long([3]), torch.tensor([50.0])),
                       allowed=(long([1]), long([1, 1]), long([2, 3])), banned=(long([0]), long([5])))
    sample(logits, batch)
    assert torch.equal(logits, before)


# ---- the host arrays of a step -----------------------------------------------------------------------------------

VOCAB = 64


def request(name: str, prompt: list[int], outputs: list[int], params: SamplingParams) -> Request:
    r = Request(name, list(prompt), params, max_tokens=16, sampling_seed=0)
    r.token_ids += outputs
    return r


def decode_chunk(r: Request) -> ScheduledChunk:
    """The request's last token as this step's decode row, sampling the next (as the scheduler appends it)."""
    chunk = ScheduledChunk(r, r.num_tokens - 1, 1, sample=True, output_index=r.num_tokens)
    r.token_ids.append(PLACEHOLDER)
    return chunk


def build(chunks: list[ScheduledChunk]):
    for c in chunks:  # pages for the tokens each chunk reaches
        first = 100 * len(c.request.request_id)
        c.request.set_page_table(list(range(first, first - (-(c.start + c.num_tokens) // 4))))
    sched = SchedulerOutput(chunks=chunks, num_batched_tokens=sum(c.num_tokens for c in chunks))
    return build_host_batch(sched, block_size=4, vocab_size=VOCAB)


def with_words(params: SamplingParams, words: list[list[int]]) -> SamplingParams:
    params.bad_words_token_ids = words  # what the input processor sets
    return params


def test_no_control_arrays_in_a_batch_that_uses_none():
    plain = request("a", [1, 2, 3], [4], SamplingParams(temperature=0))
    sampling = build([decode_chunk(plain)]).sampling
    for name in ("bias_rows", "bias_tokens", "bias_values", "restricted_rows", "allowed_rows", "allowed_tokens",
                 "ban_if_rows", "ban_if_tokens", "ban_if_after", "ban_if_inputs", "banned_rows"):
        assert getattr(sampling, name) is None, name


def test_host_arrays_of_bias_and_allowed_tokens():
    plain = request("a", [1, 2, 3], [4], SamplingParams(temperature=0))
    biased = request("bb", [1, 2], [5], SamplingParams(logit_bias={3: 1.5, 9: -2.0}))
    allowed = request("ccc", [7], [], SamplingParams(allowed_token_ids=[4, 8, 15]))
    sampling = build([decode_chunk(plain), decode_chunk(biased), decode_chunk(allowed)]).sampling
    assert sampling.bias_rows.tolist() == [1, 1]
    assert sampling.bias_tokens.tolist() == [3, 9]
    assert sampling.bias_values.tolist() == [1.5, -2.0]
    assert sampling.restricted_rows.tolist() == [2]
    assert sampling.allowed_rows.tolist() == [2, 2, 2]
    assert sampling.allowed_tokens.tolist() == [4, 8, 15]


def test_bad_words_are_decided_on_the_host_when_the_tokens_are_known():
    words = [[9], [5, 6], [1, 2, 3]]
    params = with_words(SamplingParams(bad_words=["x"]), words)
    cases = {  # output so far -> the tokens banned at the next step
        (): [9],  # a prefix in the prompt does not count
        (5,): [9, 6],
        (1, 2): [9, 3],
        (4, 1, 2): [9, 3],
        (1, 5): [9, 6],
        (2, 1): [9],
    }
    chunks = [decode_chunk(request("r" * (i + 1), [1, 2, 5], list(out), params)) for i, out in enumerate(cases)]
    host = build(chunks)
    assert host.sampling.ban_if_rows is None  # every token is on the host
    pairs = sorted(zip(host.sampling.banned_rows.tolist(), host.sampling.banned_tokens.tolist()))
    assert pairs == sorted((row, t) for row, banned in enumerate(cases.values()) for t in banned)


def test_bad_words_ending_at_a_token_still_on_the_device_become_conditional_bans():
    words = [[9], [5, 6], [1, 2, 3], [7, 2, 4]]
    params = with_words(SamplingParams(bad_words=["x"]), words)
    plain = request("a", [1, 2, 3, 4], [8], SamplingParams(temperature=0))
    # outputs [1, ?] and [7, ?]: the newest token is still on the device (overlap scheduling)
    first = request("bb", [3, 3], [1, PLACEHOLDER], params)
    second = request("ccc", [3, 3, 3], [0, 7, PLACEHOLDER], params)
    chunks = [decode_chunk(plain)]
    for r in (first, second):  # as the scheduler makes a decode row whose input is still on the device
        chunks.append(ScheduledChunk(r, r.num_tokens - 1, 1, sample=True, output_index=r.num_tokens))
        r.token_ids.append(PLACEHOLDER)
    host = build(chunks)
    assert host.pending_rows is not None and host.pending_rows.tolist() == [1, 2]
    sampling = host.sampling
    # single-token words are banned outright; [5, 6] after the pending token; [1, 2, 3] after [1, pending];
    # [7, 2, 4] after [7, pending]
    assert sorted(zip(sampling.banned_rows.tolist(), sampling.banned_tokens.tolist())) == [(1, 9), (2, 9)]
    conditional = sorted(zip(sampling.ban_if_rows.tolist(), sampling.ban_if_tokens.tolist(),
                             sampling.ban_if_after.tolist(), sampling.ban_if_inputs.tolist()))
    assert conditional == [(1, 3, 2, 1), (1, 6, 5, 1), (2, 4, 2, 2), (2, 6, 5, 2)]
    # each conditional ban reads its row's own input slot
    assert all(host.input_ids[i] == PLACEHOLDER for i in sampling.ban_if_inputs)


def test_a_request_with_untokenized_bad_words_is_refused():
    r = request("a", [1, 2], [3], SamplingParams(bad_words=["x"]))
    with pytest.raises(ValueError, match="bad_words"):
        build([decode_chunk(r)])


# ---- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"logit_bias": {1: 100.5}}, "logit_bias"),
    ({"logit_bias": {1: -101}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"),
    ({"logit_bias": {1: float("inf")}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {True: 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": {5: "1"}}, "logit_bias"),
    ({"logit_bias": [(5, 1.0)]}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"allowed_token_ids": [1.0]}, "allowed_token_ids"),
    ({"allowed_token_ids": 5}, "allowed_token_ids"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["  "]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
    ({"bad_words": ["w"] * (MAX_BAD_WORDS + 1)}, "bad_words"),
    ({"bad_words": ["w" * (MAX_BAD_WORDS_CHARS // 2 + 1)] * 2}, "bad_words"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_limits_are_inclusive():
    SamplingParams(logit_bias={i: 100.0 if i % 2 else -100 for i in range(MAX_LOGIT_BIAS)})
    SamplingParams(bad_words=["w"] * MAX_BAD_WORDS)
    SamplingParams(bad_words=["w" * MAX_BAD_WORDS_CHARS])
    params = SamplingParams(logit_bias={3: 1}, allowed_token_ids=(1, 2))
    assert params.logit_bias == {3: 1.0} and isinstance(params.logit_bias[3], float)
    assert params.allowed_token_ids == [1, 2]


# ---- in the engine -----------------------------------------------------------------------------------------------

PROMPTS = [
    "The quick brown fox",
    [5, 17, 300, 42, 99, 7, 250, 3, 64, 128, 11, 400, 23],
    "Once upon a time, in a small village by the sea, there lived",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=128)


@pytest.fixture(scope="module")
def overlap_llm(qwen3_dir):
    """Overlap scheduling on the CPU: each decode row's input token is still on the device when its step is built."""
    return LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=128, async_scheduling=True)


@pytest.fixture(scope="module")
def chunked_llm(qwen3_dir):
    """Tiny token budget and pool: prompts are chunked and requests preempted (then recomputed)."""
    return LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=20, block_size=4, max_num_batched_tokens=5,
               enable_prefix_caching=False)


@pytest.fixture(params=["sync", "overlap", "chunked"])
def any_llm(request, llm, overlap_llm, chunked_llm):
    return {"sync": llm, "overlap": overlap_llm, "chunked": chunked_llm}[request.param]


@pytest.fixture(scope="module")
def hf(qwen3_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()


def prompt_ids(llm: LLM, prompt: str | list[int]) -> list[int]:
    return llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def reference_greedy(hf, prompt: list[int], max_tokens: int,
                     edit: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the HF model at every step, ``edit`` applied to
    the last position's logits (given the output so far), then argmax."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            token = int(edit(logits, out).argmax())
            out.append(token)
            ids.append(token)
    return out


def greedy(**kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs)


def generate(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_a_large_bias_makes_greedy_output_that_token(any_llm):
    target = 321
    base = generate(any_llm, PROMPTS, greedy())
    assert all(target not in out for out in base), "pick a token greedy decoding does not choose anyway"
    outs = generate(any_llm, PROMPTS, greedy(logit_bias={target: 100.0}))
    assert outs == [[target] * MAX_TOKENS] * len(PROMPTS)


def test_moderate_biases_and_a_penalty_match_the_reference(llm, overlap_llm, hf):
    """Biases that change some choices but not all, after a repetition penalty, against the HF reference."""
    base = generate(llm, PROMPTS, greedy())
    # favour the runners-up of the unbiased run a little, and penalise its first choices
    bias = {t: -3.0 for t in {out[0] for out in base}} | {7: 4.0, 250: 5.0, 454: -6.0}
    params = greedy(logit_bias=bias, repetition_penalty=1.3)

    def edit(logits: torch.Tensor, out: list[int], ids: list[int]) -> torch.Tensor:
        seen = torch.tensor(sorted(set(ids) | set(out)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.3, logits[seen] * 1.3)
        for token, value in bias.items():
            logits[token] += value
        return logits

    expected = []
    for prompt in PROMPTS:
        ids = prompt_ids(llm, prompt)
        expected.append(reference_greedy(hf, ids, MAX_TOKENS, lambda logits, out, ids=ids: edit(logits, out, ids)))
    assert expected != base
    assert generate(llm, PROMPTS, params) == expected
    assert generate(overlap_llm, PROMPTS, params) == expected


def test_allowed_token_ids_restrict_every_sampled_token(any_llm):
    allowed = [11, 42, 97, 256, 300, 411]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=48, ignore_eos=True, allowed_token_ids=allowed)
    outs = generate(any_llm, PROMPTS, params)
    for out in outs:
        assert len(out) == 48 and set(out) <= set(allowed)
    assert len({t for out in outs for t in out}) >= 4, "random sampling over the allowed tokens"
    # and without the control the same seeds do sample other tokens
    unrestricted = generate(any_llm, PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=48, ignore_eos=True))
    assert any(not set(out) <= set(allowed) for out in unrestricted)


def test_allowed_token_ids_greedy_matches_the_reference(llm, hf):
    allowed = [11, 42, 97, 256, 300, 411]

    def edit(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    outs = generate(llm, PROMPTS, greedy(allowed_token_ids=allowed))
    assert outs == [reference_greedy(hf, prompt_ids(llm, p), MAX_TOKENS, edit) for p in PROMPTS]


def _word(llm: LLM, ids: list[int]) -> str | None:
    """The text of ``ids`` when it is a word whose tokenization (as-is or after a space) is exactly ``ids``."""
    tok = llm.tokenizer
    text = tok.decode(ids)
    if not text.strip() or "\ufffd" in text or not text.isprintable():
        return None
    return text if ids in _banned_forms(llm, [text]) else None


def _banned_forms(llm: LLM, words: list[str]) -> list[list[int]]:
    """The token sequences a bad word stands for: the word as-is and after a space (leading spaces dropped)."""
    tok = llm.tokenizer
    return [tok.encode(form, add_special_tokens=False) for w in words for form in (w.lstrip(), " " + w.lstrip())]


def _first_completion(seq: list[int], forms: list[list[int]]) -> tuple[int, list[int]] | None:
    """Where in ``seq`` one of ``forms`` first ends, and which."""
    for end in range(len(seq)):
        for form in forms:
            if end + 1 >= len(form) and seq[end + 1 - len(form) : end + 1] == form:
                return end, form
    return None


def _pair_word(llm: LLM, base: list[int]) -> str:
    """A word of two tokens said in the greedy output ``base``, the first of its forms to be said there."""
    for i in range(len(base) - 1):
        text = _word(llm, base[i : i + 2])
        if text is None:
            continue
        found = _first_completion(base, _banned_forms(llm, [text]))
        if found is not None and len(found[1]) == 2:
            return text
    raise AssertionError("the greedy output should hold a pair of tokens that is a word")


def _single_word(llm: LLM, base: list[int], avoid: set[int]) -> str:
    for token in base:
        text = _word(llm, [token])
        if text is not None and not {t for f in _banned_forms(llm, [text]) for t in f} & avoid:
            return text
    raise AssertionError("the greedy output should hold a one-token word")


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


class _Spy:
    """Records the ban arrays of every step the engine builds."""

    def __init__(self) -> None:
        self.conditional: list[tuple[int, int]] = []  # (token, after) of the bans decided on the device
        self.banned: list[int] = []  # the tokens of those decided on the host
        self.pending_steps = 0  # steps with an input token still on the device

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "_Spy":
        import nanovllm.engine.engine_core as engine_core

        build = engine_core.build_host_batch

        def wrapped(*args: Any, **kwargs: Any):
            host = build(*args, **kwargs)
            self.pending_steps += host.pending_rows is not None
            sampling = host.sampling
            if sampling is not None and sampling.ban_if_rows is not None:
                self.conditional += zip(sampling.ban_if_tokens.tolist(), sampling.ban_if_after.tolist())
            if sampling is not None and sampling.banned_tokens is not None:
                self.banned += sampling.banned_tokens.tolist()
            return host

        monkeypatch.setattr(engine_core, "build_host_batch", wrapped)
        return self


def _ban_reference(forms: list[list[int]]) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    def edit(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        for form in forms:
            prefix = form[:-1]
            if len(out) >= len(prefix) and out[len(out) - len(prefix) :] == prefix:
                logits[form[-1]] = float("-inf")
        return logits

    return edit


@pytest.mark.parametrize("mode", ["sync", "overlap", "chunked"])
def test_bad_words_never_appear(mode, llm, overlap_llm, chunked_llm, hf, monkeypatch):
    engine = {"sync": llm, "overlap": overlap_llm, "chunked": chunked_llm}[mode]
    checked = 0
    for prompt in PROMPTS:
        base = generate(llm, [prompt], greedy())[0]
        pair_word = _pair_word(llm, base)
        single_word = _single_word(llm, base, avoid={t for f in _banned_forms(llm, [pair_word]) for t in f})
        forms = _banned_forms(llm, [pair_word, single_word])
        assert {len(f) for f in forms} >= {1, 2}
        expected = reference_greedy(hf, prompt_ids(llm, prompt), MAX_TOKENS, _ban_reference(forms))
        spy = _Spy().install(monkeypatch)
        out = generate(engine, [prompt], greedy(bad_words=[pair_word, single_word]))[0]
        assert out == expected
        assert out != base
        for form in forms:
            assert not _contains(out, form), (form, out)
        if mode == "overlap":
            # every decode step read its input token on the device, so the words of several tokens were banned
            # there, and the host banned only the one-token words
            assert spy.pending_steps >= MAX_TOKENS - 2
            assert set(spy.banned) <= {f[0] for f in forms if len(f) == 1}
            assert any((f[1], f[0]) in spy.conditional for f in forms if len(f) == 2)
        else:
            assert not spy.conditional, "without overlap every token is on the host"
        checked += 1
    assert checked == len(PROMPTS)


def test_the_device_ban_is_what_stops_the_word_with_overlap(overlap_llm, monkeypatch):
    """The word's first token is the newest output token when its second would be sampled: with overlap the host
    never sees it in time, so only the conditional ban on the device can prevent the word."""
    for prompt in PROMPTS:
        base = generate(overlap_llm, [prompt], greedy())[0]
        pair_word = _pair_word(overlap_llm, base)
        end, form = _first_completion(base, _banned_forms(overlap_llm, [pair_word]))
        spy = _Spy().install(monkeypatch)
        out = generate(overlap_llm, [prompt], greedy(bad_words=[pair_word]))[0]
        assert out[:end] == base[:end] and out[end] != base[end]  # the first change is where the word would end
        assert (form[1], form[0]) in spy.conditional
        assert set(spy.banned) <= {f[0] for f in _banned_forms(overlap_llm, [pair_word]) if len(f) == 1}


def test_controlled_requests_leave_the_others_unchanged(any_llm, chunked_llm):
    """Requests using the controls batched with requests that do not: the latter's tokens are those of a run
    without the former, and the former's those of a run alone."""
    plain = [
        (PROMPTS[0], greedy()),
        (PROMPTS[1], SamplingParams(temperature=0.8, top_k=50, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)),
        (PROMPTS[2], SamplingParams(temperature=1.0, seed=9, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    presence_penalty=0.5, min_p=0.05)),
    ]
    base = generate(any_llm, [PROMPTS[1]], greedy())[0]
    pair_word = _pair_word(any_llm, base)
    words = [pair_word, _single_word(any_llm, base, avoid={t for f in _banned_forms(any_llm, [pair_word]) for t in f})]
    controlled = [
        (PROMPTS[1], greedy(logit_bias={300: 6.0, 42: -50.0})),
        (PROMPTS[0], SamplingParams(temperature=1.0, seed=4, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    allowed_token_ids=[3, 64, 128, 400])),
        (PROMPTS[1], greedy(bad_words=words)),
        (PROMPTS[2], SamplingParams(temperature=0.7, seed=8, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    logit_bias={7: 2.0}, allowed_token_ids=[7, 8, 9, 10], bad_words=words)),
    ]
    alone_plain = generate(any_llm, [p for p, _ in plain], [s for _, s in plain])
    alone_controlled = [generate(any_llm, [p], [s])[0] for p, s in controlled]
    mixed = [plain[0], controlled[0], controlled[1], plain[1], controlled[2], plain[2], controlled[3]]
    together = generate(any_llm, [p for p, _ in mixed], [s for _, s in mixed])
    assert [together[i] for i in (0, 3, 5)] == alone_plain
    assert [together[i] for i in (1, 2, 4, 6)] == alone_controlled
    assert set(alone_controlled[1]) <= {3, 64, 128, 400} and set(alone_controlled[3]) <= {7, 8, 9, 10}
    if any_llm is chunked_llm:
        assert chunked_llm.engine.core.scheduler.num_preemptions > 0


def test_n_samples_and_seeds_with_controls(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=16, ignore_eos=True,
                            allowed_token_ids=list(range(100, 140)), logit_bias={120: 3.0})
    first = [c.token_ids for c in llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs]
    assert first == [c.token_ids for c in llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs]
    assert len({tuple(t) for t in first}) == 3
    assert all(100 <= t < 140 for out in first for t in out)


def test_the_engine_checks_ids_against_the_vocabulary(llm):
    vocab = llm.engine.input_processor.vocab_size
    cases = [
        (SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[1, vocab + 5]), "allowed_token_ids"),
        (SamplingParams(allowed_token_ids=[1] * (vocab + 1)), "allowed_token_ids"),
    ]
    for params, field in cases:
        with pytest.raises(ValueError, match=field):
            llm.generate(["fine prompt", PROMPTS[0]], [SamplingParams(), params], use_tqdm=False)
        assert not llm.engine.has_unfinished(), "nothing was queued"


def test_bad_words_are_tokenized_by_the_input_processor(llm):
    processor = llm.engine.input_processor
    tok = llm.tokenizer
    params = SamplingParams(bad_words=["fox", "  sea", "the sea"])
    processed = processor.process("x", "hello", params)
    tokenized = processed.engine_requests[0].sampling_params
    expected = []
    for word in ("fox", "sea", "the sea"):
        for form in (word, " " + word):
            ids = tok.encode(form, add_special_tokens=False)
            if ids not in expected:
                expected.append(ids)
    assert tokenized.bad_words_token_ids == expected
    assert params.bad_words_token_ids is None, "the caller's params are not changed"
    # and they survive the pipe to an engine core in its own process
    spec = pickle.loads(pickle.dumps(processed.engine_requests[0]))
    assert spec.sampling_params.bad_words_token_ids == expected
    # every sample of the request shares the tokenized params
    many = processor.process("y", "hello", SamplingParams(n=3, bad_words=["fox"]))
    assert all(r.sampling_params.bad_words_token_ids for r in many.engine_requests)


def test_bad_words_need_a_tokenizer_and_must_leave_an_allowed_token(llm):
    processor = llm.engine.input_processor
    bare = InputProcessor(processor.config, None, processor.eos_ids, processor.num_kv_pages)
    with pytest.raises(ValueError, match="bad_words"):
        bare.process("x", [1, 2, 3], SamplingParams(bad_words=["fox"]))
    # a word whose two forms are one token each: banning it while allowing only those leaves nothing to sample
    words = (_word(llm, [t]) for t in range(llm.tokenizer.vocab_size))
    word = next(w for w in words if w is not None and all(len(f) == 1 for f in _banned_forms(llm, [w])))
    ids = sorted({f[0] for f in _banned_forms(llm, [word])})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        processor.process("x", "hello", SamplingParams(bad_words=[word], allowed_token_ids=ids))
    processor.process("x", "hello", SamplingParams(bad_words=[word], allowed_token_ids=ids + [5]))


def test_host_arrays_are_plain_numpy(llm):
    """The step's arrays are what tensor-parallel ranks receive and the stager copies: numpy of its dtypes."""
    r = request("a", [1, 2], [3, PLACEHOLDER], with_words(
        SamplingParams(logit_bias={4: 1.0}, allowed_token_ids=[4, 5], bad_words=["x"]), [[3, 7], [8]]))
    chunk = ScheduledChunk(r, r.num_tokens - 1, 1, sample=True, output_index=r.num_tokens)
    r.token_ids.append(PLACEHOLDER)
    sampling = build([chunk]).sampling
    for name in ("bias_rows", "bias_tokens", "restricted_rows", "allowed_rows", "allowed_tokens", "ban_if_rows",
                 "ban_if_tokens", "ban_if_after", "ban_if_inputs", "banned_rows", "banned_tokens"):
        assert getattr(sampling, name).dtype == np.int64, name
    assert sampling.bias_values.dtype == np.float32


# ---- tensor and pipeline parallelism, and the GPU fast path ------------------------------------------------------


def _mixed_requests(llm: LLM) -> tuple[list, list[SamplingParams], list[list[int]]]:
    """Requests using every control beside one using none, and the token forms of the bad words."""
    base = generate(llm, [PROMPTS[1]], greedy())[0]
    pair_word = _pair_word(llm, base)
    params = [
        greedy(bad_words=[pair_word]),
        greedy(logit_bias={11: 3.0, 300: 4.0}),
        SamplingParams(temperature=0.9, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True,
                       allowed_token_ids=[1, 2, 3, 50, 60]),
        greedy(),
    ]
    return [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1]], params, _banned_forms(llm, [pair_word])


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2, "async_scheduling": True},
                                    {"pipeline_parallel_size": 2}], ids=["tp2-overlap", "pp2"])
def test_parallel_ranks_apply_the_controls_alike(layout, llm, qwen3_dir):
    """Every rank that samples applies the controls (and with overlap, reads the same newest token on its own
    device), so the tokens are those of one process."""
    prompts, params, forms = _mixed_requests(llm)
    expected = generate(llm, prompts, params)
    parallel = LLM(qwen3_dir, device="cpu", dtype="float32", num_kv_blocks=128, **layout)
    try:
        outs = generate(parallel, prompts, params)
    finally:
        parallel.shutdown()
    assert outs == expected
    assert not any(_contains(outs[0], f) for f in forms) and any(_contains(outs[3], f) for f in forms)
    assert set(outs[2]) <= {1, 2, 3, 50, 60}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_controls_on_the_gpu_fast_path(tmp_path, monkeypatch):
    """CUDA graphs, the Triton sampling kernel and overlap scheduling (on by default) against the CPU engine, in
    float32: the same tokens, and the bad word banned on the device."""
    from nanovllm.testing import build_checkpoint

    path = build_checkpoint(tmp_path / "gpu_qwen3", "Qwen3ForCausalLM", hidden_size=256, intermediate_size=512,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            with_tokenizer=True)
    cpu = LLM(path, device="cpu", dtype="float32", num_kv_blocks=128)
    prompts, params, forms = _mixed_requests(cpu)
    expected = generate(cpu, prompts, params)
    gpu = LLM(path, device="cuda", dtype="float32", max_model_len=256)
    assert gpu.engine.core.overlap and gpu.engine.core.executor.graphs is not None
    spy = _Spy().install(monkeypatch)
    assert generate(gpu, prompts, params) == expected
    assert any((f[1], f[0]) in spy.conditional for f in forms if len(f) == 2)
    assert not any(_contains(expected[0], f) for f in forms) and any(_contains(expected[3], f) for f in forms)
