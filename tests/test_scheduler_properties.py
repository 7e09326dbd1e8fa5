"""Property tests of the scheduler and the KV page manager, with no model: a fake executor samples random tokens.

Random scenarios (arrivals at random steps, prompt lengths, max_tokens, min_tokens, pool and page sizes, token
budgets, max_num_seqs, eos and abort rates) are played step by step: ``schedule()``, then one fake token per
sampled chunk into ``update()``. After every call the invariants below are checked; at the end every request has
finished within a bound and every page is free again.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm.engine.kv_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import Scheduler, SchedulerOutput
from nanovllm.sampling_params import SamplingParams

from nanovllm.engine.request import PLACEHOLDER
from nanovllm.executor.base import ModelOutput

EOS = 0
VOCAB = 50


def model_output(tokens: list[int]) -> ModelOutput:
    return ModelOutput(token_ids=tokens)


@dataclass
class Spec:
    arrival: int
    prompt_len: int
    max_tokens: int
    min_tokens: int
    shared: int = 0  # leading prompt tokens taken from one base sequence (prefix-cache hits)


@dataclass
class Scenario:
    block_size: int
    num_pages: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    specs: list[Spec]
    eos_prob: float
    abort_prob: float
    seed: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    block_size = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]))
    max_model_len = draw(st.integers(4, 48))
    specs = []
    for _ in range(draw(st.integers(1, 10))):
        prompt_len = draw(st.integers(1, max_model_len - 1))
        max_tokens = draw(st.integers(1, min(16, max_model_len - prompt_len)))
        specs.append(
            Spec(
                arrival=draw(st.one_of(st.just(0), st.integers(0, 12))),
                prompt_len=prompt_len,
                max_tokens=max_tokens,
                min_tokens=draw(st.integers(0, max_tokens)),
                shared=draw(st.one_of(st.just(prompt_len), st.integers(0, prompt_len))),
            )
        )
    # the engine refuses a request whose prompt + max_tokens cannot fit the whole pool; the pool is drawn from
    # "just the largest request" (constant preemption) to "roomy"
    largest = max(-(-(s.prompt_len + s.max_tokens) // block_size) for s in specs)
    tight = draw(st.booleans())
    extra = draw(st.integers(0, 1)) if tight else draw(st.integers(0, 2 * largest + 4))
    num_pages = largest + extra
    return Scenario(
        block_size=block_size,
        num_pages=num_pages,
        max_num_batched_tokens=draw(st.integers(1, 64)),
        max_num_seqs=draw(st.integers(2, 6)) if tight else draw(st.integers(1, 6)),
        max_model_len=max_model_len,
        specs=specs,
        eos_prob=draw(st.sampled_from([0.0, 0.0, 0.1, 0.4])),
        abort_prob=draw(st.sampled_from([0.0, 0.0, 0.05])),
        seed=draw(st.integers(0, 2**16)),
    )


BASE = [(7 * i) % (VOCAB - 1) + 1 for i in range(64)]  # no eos in prompts


def make_request(i: int, spec: Spec, rng: random.Random) -> Request:
    params = SamplingParams(temperature=0, max_tokens=spec.max_tokens, min_tokens=spec.min_tokens)
    prompt = BASE[: spec.shared] + [rng.randrange(1, VOCAB) for _ in range(spec.prompt_len - spec.shared)]
    return Request(
        request_id=f"r{i}",
        prompt_token_ids=prompt,
        sampling_params=params,
        max_tokens=spec.max_tokens,
        sampling_seed=i,
        eos_token_ids=frozenset({EOS}),
    )


def real_tokens(request: Request) -> int:
    """Tokens known on the host: the prompt and the sampled outputs, not reserved placeholder slots."""
    if PLACEHOLDER is None:
        return request.num_tokens
    return sum(1 for t in request.token_ids if t != PLACEHOLDER)


# ---- invariants ----------------------------------------------------------------------------------------------


def check_state(sched: Scheduler, kv: KVCacheManager) -> None:
    """Queues, statuses and page ownership, valid between any two calls."""
    running, waiting = sched.running, list(sched.waiting)
    cache = kv.prefix_cache
    assert len(running) <= sched.max_num_seqs
    assert len({id(r) for r in running}) == len(running)
    assert not {id(r) for r in running} & {id(r) for r in waiting}
    assert {r.request_id for r in running + waiting} == set(sched.requests)
    holders: Counter[int] = Counter()
    for request in running:
        assert request.status == RequestStatus.RUNNING
        # the page table covers every computed token
        assert len(request.page_table) * kv.page_size >= request.num_computed_tokens
        assert request.num_computed_tokens <= request.num_tokens
        assert len(set(request.page_table)) == len(request.page_table)
        holders.update(request.page_table)
    for request in waiting:
        assert request.status == RequestStatus.WAITING
        assert request.page_table == [], "a waiting request holds no pages"
        assert request.num_computed_tokens == 0
    refs = [kv.allocator.ref_count(p) for p in range(kv.num_pages)]
    assert kv.allocator.num_free == refs.count(0)
    num_cached = 0 if cache is None else cache.num_cached_pages
    # every reference is a page-table entry or the cache's one reference: no leak, no double allocation
    assert sum(refs) == sum(holders.values()) + num_cached
    for page, count in holders.items():
        assert refs[page] - count in ((0, 1) if cache is not None else (0,))
    if cache is None:
        assert max(holders.values(), default=1) == 1, "no page in two page tables"
    else:
        cache.check_invariants()


class ShadowKV:
    """What the executor's KV pool would hold: for each (page, offset), the (request, position) written there.

    Page copies run first, then every chunk's tokens are written; before that, each chunk's context (positions
    before its start) must read back exactly the request's own tokens through its page table."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.slots: dict[int, list] = {}

    def apply(self, out: SchedulerOutput, kv: KVCacheManager) -> None:
        ps = self.page_size
        for src, dst in out.page_copies:
            self.slots[dst] = list(self.slots.get(src, [None] * ps))
        written: set[int] = set()
        for chunk in out.chunks:
            request, table = chunk.request, chunk.request.page_table
            for pos in range(chunk.start):
                entry = self.slots.get(table[pos // ps], [None] * ps)[pos % ps]
                assert entry is not None, f"{request.request_id}: position {pos} reads a slot never written"
                owner, owner_pos = entry
                value = owner.token_ids[owner_pos] if owner_pos < len(owner.token_ids) else None
                assert value is not None and value != PLACEHOLDER
                assert value == request.token_ids[pos], f"{request.request_id}: wrong KV at position {pos}"
            for pos in range(chunk.start, chunk.start + chunk.num_tokens):
                page = table[pos // ps]
                written.add(page)
                self.slots.setdefault(page, [None] * ps)[pos % ps] = (request, pos)
        for page in written:  # a page being written belongs to its writer alone: not shared, not cached
            assert kv.allocator.ref_count(page) == 1, f"page {page} is written while shared"


def check_schedule(
    sched: Scheduler,
    out: SchedulerOutput,
    running_before: dict[int, int],
    waiting_before: list[Request],
    tokens_before: dict[int, int],
    overlap: bool = False,
    in_flight_ids: frozenset[int] = frozenset(),
    max_seqs: int | None = None,
    running_requests_before: list[Request] | None = None,
) -> None:
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.chunks) <= sched.max_num_seqs
    assert len({id(c.request) for c in out.chunks}) == len(out.chunks), "one chunk per request per step"
    if sched.has_unfinished():
        # with overlap, a request whose last token is still in flight is not scheduled again, so a step may be
        # empty when every running request is in that state (and nothing waiting fits)
        at_limit = all(
            r.num_output_tokens >= r.max_tokens or r.num_tokens >= sched.max_model_len for r in sched.running
        )
        # with micro-batches, a step may be empty while others are in flight (their requests wait for them, and
        # their pages cannot be taken back)
        if not (overlap and at_limit and sched.running) and not in_flight_ids:
            assert out.chunks, "a step with unfinished requests schedules something"
    if max_seqs is not None:
        assert len(out.chunks) <= max_seqs, "a micro-batch takes its share of the requests, not all of them"
    assert not in_flight_ids & {id(c.request) for c in out.chunks}, "a request is in one in-flight step at most"
    assert not in_flight_ids & {id(r) for r in out.preempted}, "a request in flight is never preempted"
    order = []
    for chunk in out.chunks:
        request = chunk.request
        assert chunk.num_tokens >= 1
        assert request.status == RequestStatus.RUNNING and request in sched.running
        assert chunk.start + chunk.num_tokens == request.num_computed_tokens
        # the page table covers the chunk, and holds no page beyond it (the runner sizes block tables by seq_len)
        assert len(request.page_table) == sched.kv.pages_for(chunk.start + chunk.num_tokens)
        # a chunk samples exactly when it reaches the end of the tokens known before this step
        assert chunk.sample == (chunk.start + chunk.num_tokens == tokens_before[id(request)])
        if chunk.sample:  # the token it samples is one the request may still produce
            new_index = tokens_before[id(request)]
            assert new_index - request.num_prompt_tokens < request.max_tokens, (
                f"{request.request_id}: scheduled to sample output #{new_index - request.num_prompt_tokens + 1} "
                f"with max_tokens={request.max_tokens}"
            )
            assert new_index < sched.max_model_len
        if id(request) in running_before:
            order.append(0 if running_before[id(request)] == 1 else 1)  # decode, then partial prefill
        else:
            order.append(2)  # admitted from the waiting queue this step
    assert order == sorted(order), f"decodes, then running prefills, then new requests: {order}"
    # new requests come from the waiting queue in queue order: its head, or (with the prefix cache, which lets a
    # prompt wait for a running prefill of its first page) a subsequence of it
    admitted = [c.request for c in out.chunks if id(c.request) not in running_before]
    if admitted and running_requests_before is not None:
        # newcomers only get what the running requests left: each running one that could run got its chunk
        scheduled = {id(c.request) for c in out.chunks}
        left_out = [r.request_id for r in running_requests_before
                    if id(r) not in in_flight_ids and id(r) not in scheduled and r.status == RequestStatus.RUNNING
                    and not (r.num_output_tokens >= r.max_tokens or r.num_tokens >= sched.max_model_len)]
        assert not left_out, f"admitted {[r.request_id for r in admitted]} while {left_out} waited"
    if sched.kv.prefix_cache is None:
        assert admitted == waiting_before[: len(admitted)]
    else:
        remaining = iter(waiting_before)
        assert all(any(r is w for w in remaining) for r in admitted)
    # recompute preemption takes the newest running requests (of those not in flight): the preempted ones are a
    # suffix of that list
    order_before = [r for r in running_before if r not in in_flight_ids]
    if out.preempted:
        preempted = {id(r) for r in out.preempted}
        assert set(order_before[len(order_before) - len(preempted) :]) == preempted, "only the newest are preempted"
        assert not admitted, "nothing is admitted in a step that had to preempt"
    for request in out.preempted:
        assert request.status == RequestStatus.WAITING and request.page_table == []
        assert request not in [c.request for c in out.chunks]


def play(sc: Scenario, overlap: bool = False, prefix_caching: bool = False, micro_batches: int = 1) -> None:
    """Play a scenario. ``overlap``: one step stays in flight (placeholders chain the tokens). ``micro_batches``:
    up to that many disjoint steps in flight, the oldest collected when the next is launched (as the engine does
    for a pipeline of that many stages)."""
    rng = random.Random(sc.seed)
    kv = KVCacheManager(sc.num_pages, sc.block_size, enable_prefix_caching=prefix_caching)
    shadow = ShadowKV(sc.block_size)
    sched = Scheduler(kv, sc.max_num_seqs, sc.max_num_batched_tokens, sc.max_model_len, micro_batches)
    max_in_flight = (micro_batches - 1) + (1 if overlap else 0)
    requests = [make_request(i, spec, rng) for i, spec in enumerate(sc.specs)]
    arrivals = sorted(range(len(requests)), key=lambda i: sc.specs[i].arrival)
    aborted: set[str] = set()
    work = sum(s.prompt_len + s.max_tokens for s in sc.specs)
    # generous: recomputation after preemption repeats work, at most once per other request
    # (with micro-batches a request waits out its step in flight: up to micro_batches calls per step of its own)
    bound = max(s.arrival for s in sc.specs) + micro_batches * (work * (len(requests) + 1) + 10)
    in_flight: list[SchedulerOutput] = []  # scheduled but not yet updated (depth 2 when overlapping)

    def fake_tokens(out: SchedulerOutput) -> list[int]:
        return [EOS if rng.random() < sc.eos_prob else rng.randrange(1, VOCAB) for _ in out.sampled_chunks]

    def do_update(out: SchedulerOutput) -> None:
        sched.update(out, model_output(fake_tokens(out)))
        for chunk in out.chunks:
            request = chunk.request
            assert request.num_output_tokens <= request.max_tokens
        check_state(sched, kv)

    step = 0
    next_arrival = 0
    while next_arrival < len(arrivals) or sched.has_unfinished() or in_flight:
        assert step <= bound, f"not finished after {step} steps"
        while next_arrival < len(arrivals) and sc.specs[arrivals[next_arrival]].arrival <= step:
            sched.add_request(requests[arrivals[next_arrival]])
            next_arrival += 1
        if sc.abort_prob and sched.requests and rng.random() < sc.abort_prob:
            victim = rng.choice(sorted(sched.requests))
            sched.abort_request(victim)
            aborted.add(victim)
            check_state(sched, kv)
        running_before = {id(r): r.num_pending_tokens for r in sched.running}
        running_requests_before = list(sched.running)
        waiting_before = list(sched.waiting)
        tokens_before = {id(r): r.num_tokens for r in sched.requests.values()}
        in_flight_ids = frozenset(id(c.request) for step_out in in_flight for c in step_out.chunks
                                  if not c.request.is_finished) if micro_batches > 1 else frozenset()
        runnable = min(len(sched.running) + len(sched.waiting), sc.max_num_seqs)
        max_seqs = max(1, -(-runnable // micro_batches)) if micro_batches > 1 else None
        out = sched.schedule()
        check_schedule(sched, out, running_before, waiting_before, tokens_before, overlap, in_flight_ids, max_seqs,
                       running_requests_before)
        check_state(sched, kv)
        shadow.apply(out, kv)
        if not out.is_empty:
            in_flight.append(out)
        if in_flight and (len(in_flight) > max_in_flight or out.is_empty):
            do_update(in_flight.pop(0))
        step += 1

    assert not sched.requests and not sched.running and not sched.waiting
    if kv.prefix_cache is not None:  # only the cache holds pages now, and none of them is locked
        assert kv.allocator.num_free + kv.prefix_cache.num_cached_pages == kv.num_pages
        assert kv.prefix_cache.num_evictable_pages == kv.prefix_cache.num_cached_pages
        kv.prefix_cache.reset()
    assert kv.allocator.num_free == kv.num_pages, "every page is free at the end"
    for request in requests:
        assert request.is_finished
        assert request.page_table == []
        if PLACEHOLDER is not None:
            assert PLACEHOLDER not in request.token_ids
        outputs = request.output_token_ids
        params = request.sampling_params
        if request.request_id in aborted:
            continue
        if request.status == RequestStatus.FINISHED_STOPPED:
            assert outputs[-1] == EOS and len(outputs) >= params.min_tokens
            assert EOS not in outputs[params.min_tokens : -1], "the first eos after min_tokens stops"
        else:
            assert request.status == RequestStatus.FINISHED_LENGTH
            assert len(outputs) == request.max_tokens
            assert EOS not in outputs[params.min_tokens :]


SETTINGS = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(scenarios())
def test_scheduler_invariants(sc: Scenario) -> None:
    play(sc)


@settings(SETTINGS, max_examples=300)
@given(scenarios())
def test_scheduler_invariants_overlapped(sc: Scenario) -> None:
    """Overlap scheduling: step N+1 is scheduled before step N's tokens are folded in."""
    play(sc, overlap=True)


@settings(SETTINGS, max_examples=400)
@given(scenarios())
def test_scheduler_invariants_with_prefix_cache(sc: Scenario) -> None:
    play(sc, prefix_caching=True)


@settings(SETTINGS, max_examples=200)
@given(scenarios())
def test_scheduler_invariants_with_prefix_cache_overlapped(sc: Scenario) -> None:
    play(sc, overlap=True, prefix_caching=True)


@settings(SETTINGS, max_examples=300)
@given(scenarios(), st.sampled_from([2, 3]))
def test_scheduler_invariants_with_micro_batches(sc: Scenario, micro_batches: int) -> None:
    """Pipeline parallelism: disjoint micro-batches in flight, never preempting a request that is in one."""
    play(sc, micro_batches=micro_batches)


@settings(SETTINGS, max_examples=150)
@given(scenarios())
def test_scheduler_invariants_with_micro_batches_and_prefix_cache(sc: Scenario) -> None:
    play(sc, prefix_caching=True, micro_batches=2)


def test_overlap_never_schedules_past_max_tokens() -> None:
    """With overlap, step N+1 is scheduled before step N's token is known. When step N samples a request's
    max_tokens-th token, the request is certain to finish, so step N+1 must not decode it again (vLLM's async
    scheduler skips such requests): that decode is wasted work, takes a KV page the request's fit-check budget
    never counted, and under page pressure causes needless preemption."""
    kv = KVCacheManager(num_pages=16, page_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    request = make_request(0, Spec(0, 3, 2, 0), random.Random(0))  # 3 prompt tokens, max_tokens=2
    sched.add_request(request)
    first = sched.schedule()  # prefill; samples output #1
    second = sched.schedule()  # decode of output #1's placeholder; samples output #2 (the last)
    assert [c.request for c in second.chunks] == [request]
    sched.update(first, model_output([7]))
    third = sched.schedule()  # scheduled before output #2 is known: nothing is left to sample for this request
    assert request not in [c.request for c in third.chunks], "scheduled to sample output #3 with max_tokens=2"
    sched.update(second, model_output([8]))
    if not third.is_empty:
        sched.update(third, model_output([9] * len(third.sampled_chunks)))
    assert request.status == RequestStatus.FINISHED_LENGTH and request.output_token_ids == [7, 8]
    assert kv.allocator.num_free == kv.num_pages


def test_preemption_recomputes_and_frees() -> None:
    """A constructed case: two requests in a pool that holds only one of them at full length."""
    kv = KVCacheManager(num_pages=3, page_size=2, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    rng = random.Random(0)
    a = make_request(0, Spec(0, 3, 3, 0), rng)  # 6 tokens: 3 pages
    b = make_request(1, Spec(0, 2, 3, 0), rng)  # 5 tokens: 3 pages
    sched.add_request(a)
    sched.add_request(b)
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        check_state(sched, kv)
        sched.update(out, model_output([7] * len(out.sampled_chunks)))
        check_state(sched, kv)
        steps += 1
        assert steps < 50
    assert sched.num_preemptions > 0
    assert b.num_preemptions > 0 and a.num_preemptions == 0, "the older request is never preempted"
    assert a.output_token_ids == [7, 7, 7] and b.output_token_ids == [7, 7, 7]
    assert kv.allocator.num_free == 3
