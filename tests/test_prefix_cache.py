"""Tests for the radix prefix cache: constructed cases, then a stateful property test that plays requests."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanovllm.engine.kv_cache import OutOfPagesError, PageAllocator
from nanovllm.engine.prefix_cache import RadixCache


def make(num_pages: int = 32, page_size: int = 4) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, page_size)


def cache_seq(alloc: PageAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """What a finished request does: own pages for its tokens, insert, drop its own references."""
    pages = alloc.allocate(-(-len(tokens) // cache.page_size))
    cache.insert(tokens, pages)
    alloc.decref(pages)
    return pages


# -- match ---------------------------------------------------------------------------------------------------------


def test_match_lengths_aligned_and_mid_page():
    alloc, cache = make()
    pages = cache_seq(alloc, cache, list(range(10)))  # 2 full pages + 2 tokens that are not cached
    assert cache.num_cached_pages == 2
    m = cache.match(list(range(8)))
    assert (m.pages, m.num_tokens, m.partial_page) == (pages[:2], 8, None)
    m = cache.match(list(range(6)))  # ends mid page: one full page, then 2 tokens of the next page
    assert (m.pages, m.num_tokens, m.partial_page, m.partial_tokens) == (pages[:1], 4, pages[1], 2)
    m = cache.match(list(range(12)))  # longer than the cache
    assert (m.pages, m.num_tokens, m.partial_page, m.partial_tokens) == (pages[:2], 8, None, 0)
    m = cache.match([0, 1])  # shorter than a page
    assert (m.pages, m.num_tokens, m.partial_page, m.partial_tokens) == ([], 0, pages[0], 2)
    assert m.last_node is cache.root
    m = cache.match([])
    assert (m.num_tokens, m.partial_page) == (0, None)
    cache.check_invariants()


def test_branch_in_middle_of_page_reports_partial():
    alloc, cache = make()
    pages = cache_seq(alloc, cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    m = cache.match([1, 2, 3, 4, 5, 6, 99, 8, 9])
    assert (m.pages, m.num_tokens, m.partial_page, m.partial_tokens) == (pages[:1], 4, pages[1], 2)
    assert m.num_tokens + m.partial_tokens <= 9
    # The longest candidate among siblings wins.
    other = cache_seq(alloc, cache, [1, 2, 3, 4, 5, 6, 7, 0])
    m = cache.match([1, 2, 3, 4, 5, 6, 7, 1])
    assert m.partial_page in (pages[1], other[1]) and m.partial_tokens == 3
    m = cache.match([1, 2, 3, 4, 5, 6, 7, 0, 3])
    assert (m.num_tokens, m.partial_tokens) == (8, 0)
    cache.check_invariants()


def test_match_splits_node_and_keeps_handles_valid():
    alloc, cache = make()
    cache_seq(alloc, cache, list(range(12)))
    deep = cache.match(list(range(12))).last_node
    cache.lock(deep)
    m = cache.match(list(range(5)))  # splits after the first page
    assert m.num_tokens == 4 and m.last_node is not deep and deep.parent is m.last_node
    assert m.last_node.lock_ref == 1  # the upper part inherited the lock
    cache.check_invariants()
    assert cache.evict(10) == 0
    cache.unlock(deep)
    assert cache.num_evictable_pages == 3
    cache.check_invariants()


# -- insert --------------------------------------------------------------------------------------------------------


def test_duplicate_insert_keeps_cached_pages():
    alloc, cache = make(num_pages=8, page_size=2)
    first = alloc.allocate(3)
    r = cache.insert([1, 2, 3, 4, 5], first)  # last page half full: not cached
    assert (r.num_cached_tokens, r.pages) == (0, first[:2])
    assert [alloc.ref_count(p) for p in first] == [2, 2, 1]
    second = alloc.allocate(3)  # the same prompt computed separately
    r2 = cache.insert([1, 2, 3, 4, 5, 6], second)
    assert r2.num_cached_tokens == 4 and r2.pages == first[:2] + second[2:3]
    assert [alloc.ref_count(p) for p in second] == [1, 1, 2]  # no reference on the duplicates
    alloc.decref(first)
    alloc.decref(second)
    assert alloc.num_free == 8 - 3 and cache.num_cached_pages == 3
    assert cache.insert([1, 2, 3, 4], [7, 7]).num_cached_tokens == 4  # fully cached: pages untouched
    cache.check_invariants()


def test_insert_splits_at_page_boundary():
    alloc, cache = make(page_size=2)
    a = cache_seq(alloc, cache, [1, 1, 2, 2, 3, 3])
    b = cache_seq(alloc, cache, [1, 1, 2, 2, 4, 4, 5, 5])
    assert cache.num_cached_pages == 5
    assert all(alloc.ref_count(p) == 1 for p in a + b[2:]) and all(alloc.ref_count(p) == 0 for p in b[:2])
    upper = cache.root.children[(1, 1)]
    assert upper.pages == a[:2] and set(upper.children) == {(3, 3), (4, 4)}
    assert cache.match([1, 1, 2, 2, 4, 4, 5, 5]).pages == a[:2] + b[2:]
    cache.check_invariants()


def test_insert_rejects_bad_pages():
    alloc, cache = make(page_size=2)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3, 4], [0])  # too few pages
    held = alloc.allocate(2)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3, 4], [held[0], held[0]])
    with pytest.raises(ValueError):
        cache.insert([1, 2], [alloc.num_pages - 1])  # a free page
    cache.insert([1, 2], held[:1])
    with pytest.raises(ValueError):
        cache.insert([5, 6], held[:1])  # already cached under other tokens
    cache.check_invariants()


# -- lock / evict --------------------------------------------------------------------------------------------------


def test_eviction_is_lru_and_trims_tails():
    alloc, cache = make(num_pages=16, page_size=2)
    a = cache_seq(alloc, cache, [1, 1, 2, 2])
    b = cache_seq(alloc, cache, [3, 3, 4, 4])
    c = cache_seq(alloc, cache, [5, 5, 6, 6])
    cache.match([1, 1, 2, 2])  # a becomes most recent: b is the oldest now
    assert cache.evict(2) == 2 and alloc.ref_count(b[0]) == 0 and cache.match([3, 3]).num_tokens == 0
    assert cache.evict(1) == 1  # only the tail page of c
    assert cache.match([5, 5, 6, 6]).pages == c[:1] and alloc.ref_count(c[1]) == 0
    assert cache.evict(100) == 3 and cache.num_cached_pages == 0 and alloc.num_free == 16
    assert all(alloc.ref_count(p) == 0 for p in a)
    cache.check_invariants()


def test_parent_becomes_candidate_after_children_go():
    alloc, cache = make(num_pages=16, page_size=1)
    cache_seq(alloc, cache, [1, 2, 3])
    cache_seq(alloc, cache, [1, 2, 4])
    cache_seq(alloc, cache, [9])
    cache.match([9])
    assert cache.evict(3) == 3  # both leaves under [1, 2], then the tail of [1, 2] before the newer [9]
    assert cache.match([9]).num_tokens == 1 and cache.match([1, 2, 3]).num_tokens == 1
    cache.check_invariants()


def test_locked_nodes_are_never_evicted():
    alloc, cache = make(num_pages=16, page_size=2)
    a = cache_seq(alloc, cache, [1, 1, 2, 2, 3, 3])
    cache_seq(alloc, cache, [7, 7])
    m = cache.match([1, 1, 2, 2])
    cache.lock(m.last_node)
    assert cache.num_evictable_pages == 2  # [3, 3] under the lock and [7, 7]
    assert cache.evict(100) == 2 and cache.num_cached_pages == 2
    assert cache.match([1, 1, 2, 2, 3, 3]).pages == a[:2]
    assert alloc.ref_count(a[2]) == 0
    assert cache.reset() == 0
    cache.unlock(m.last_node)
    with pytest.raises(RuntimeError):
        cache.unlock(m.last_node)
    assert cache.reset() == 2 and alloc.num_free == 16
    with pytest.raises(RuntimeError):
        cache.lock(m.last_node)  # evicted handle
    cache.check_invariants()


def test_evict_counts_only_real_frees():
    alloc, cache = make(num_pages=8, page_size=1)
    pages = alloc.allocate(2)
    cache.insert([1, 2], pages)  # the "request" keeps its references and does not lock
    assert cache.evict(1) == 0  # the leaf goes page by page, yet both pages survive in the request
    assert cache.num_cached_pages == 0 and alloc.num_free == 6
    alloc.decref(pages)
    assert alloc.num_free == 8
    cache.check_invariants()


def test_stats():
    _, cache = make()
    cache.record(10, 4)
    cache.record(6, 0)
    assert (cache.stats.num_queries, cache.stats.query_tokens, cache.stats.hit_tokens) == (2, 16, 4)
    assert cache.stats.hit_rate == pytest.approx(0.25)


# -- stateful property test ----------------------------------------------------------------------------------------

TOKENS = st.lists(st.integers(0, 2), max_size=12)
NUM_PAGES = 24


class Req:
    def __init__(self, tokens: list[int], pages: list[int], node) -> None:
        self.tokens, self.pages, self.node = tokens, pages, node


class CacheMachine(RuleBasedStateMachine):
    """Plays requests against the cache: match + lock, own refs on every page, copy-on-write of partial hits,
    write KV (a shadow of which tokens each page holds), insert on finish, evict under pressure."""

    @initialize(page_size=st.integers(1, 4))
    def setup(self, page_size: int) -> None:
        self.ps = page_size
        self.alloc = PageAllocator(NUM_PAGES)
        self.cache = RadixCache(self.alloc, page_size)
        self.shadow: dict[int, tuple[int, ...]] = {}  # page -> the tokens written into it
        self.reqs: list[Req] = []
        self.pins: list = []  # extra bare locks

    def _check_match(self, tokens: list[int]):
        m = self.cache.match(tokens)
        ps = self.ps
        assert m.num_tokens == len(m.pages) * ps and m.num_tokens + m.partial_tokens <= len(tokens)
        for i, page in enumerate(m.pages):
            assert self.shadow[page][:ps] == tuple(tokens[i * ps : (i + 1) * ps])
        if m.partial_page is not None:
            k = m.partial_tokens
            assert 1 <= k < ps  # a whole page of agreement would have been a full match
            assert self.shadow[m.partial_page][:k] == tuple(tokens[m.num_tokens : m.num_tokens + k])
        else:
            assert m.partial_tokens == 0
        # Maximality: the next full page of the query is not cached.
        nxt = tokens[m.num_tokens : m.num_tokens + ps]
        assert len(nxt) < ps or self.cache.match(tokens[: m.num_tokens + ps]).num_tokens == m.num_tokens
        return m

    def _write(self, page: int, tokens: list[int], index: int) -> None:
        assert page not in self.cache._pages, "a cached page must never be written"
        self.shadow[page] = tuple(tokens[index * self.ps : (index + 1) * self.ps])

    def _allocate(self, n: int) -> list[int] | None:
        if n > self.alloc.num_free:
            before = self.alloc.num_free
            freed = self.cache.evict(n - before)
            assert self.alloc.num_free == before + freed
        try:
            return self.alloc.allocate(n)
        except OutOfPagesError:
            return None

    @precondition(lambda self: len(self.reqs) < 4)
    @rule(tokens=TOKENS, use_cache=st.booleans())
    def start_request(self, tokens: list[int], use_cache: bool) -> None:
        ps = self.ps
        # Without the cache the request computes everything itself, like two identical prompts admitted in the
        # same step: its pages later turn out to be duplicates of cached ones.
        m = self._check_match(tokens) if use_cache else self.cache.match([])
        self.cache.lock(m.last_node)
        self.alloc.incref(m.pages)
        if m.partial_page is not None:
            self.alloc.incref([m.partial_page])  # keep the copy source alive across the eviction below
        fresh = self._allocate(-(-len(tokens) // ps) - len(m.pages))
        if m.partial_page is not None:
            assert self.shadow[m.partial_page][: m.partial_tokens] == tuple(tokens[m.num_tokens :][: m.partial_tokens])
            self.alloc.decref([m.partial_page])
        if fresh is None:
            self.alloc.decref(m.pages)
            self.cache.unlock(m.last_node)
            return
        for j, page in enumerate(fresh):
            self._write(page, tokens, len(m.pages) + j)
        self.reqs.append(Req(list(tokens), m.pages + fresh, m.last_node))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 3), more=TOKENS)
    def extend_request(self, i: int, more: list[int]) -> None:
        req = self.reqs[i % len(self.reqs)]
        ps, start = self.ps, len(req.tokens)
        need = -(-(start + len(more)) // ps) - len(req.pages)
        fresh = self._allocate(need)
        if fresh is None:
            return
        req.pages += fresh
        req.tokens += more
        for j in range(start // ps, -(-len(req.tokens) // ps)):
            if j * ps + ps > start:  # the page gets new tokens
                self._write(req.pages[j], req.tokens, j)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 3), keep_running=st.booleans())
    def cache_request(self, i: int, keep_running: bool) -> None:
        req = self.reqs[i % len(self.reqs)]
        n_full = len(req.tokens) // self.ps
        before = self.cache.num_cached_pages
        r = self.cache.insert(req.tokens, req.pages)
        assert r.num_cached_tokens % self.ps == 0 and len(r.pages) == n_full
        assert r.pages[r.num_cached_tokens // self.ps :] == req.pages[r.num_cached_tokens // self.ps : n_full]
        assert self.cache.num_cached_pages == before + n_full - r.num_cached_tokens // self.ps
        self.cache.lock(r.node)
        self.cache.unlock(req.node)
        req.node = r.node
        if not keep_running:
            self.alloc.decref(req.pages)
            self.cache.unlock(req.node)
            self.reqs.remove(req)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 3))
    def abort_request(self, i: int) -> None:
        req = self.reqs.pop(i % len(self.reqs))
        self.alloc.decref(req.pages)
        self.cache.unlock(req.node)

    @rule(tokens=TOKENS)
    def match(self, tokens: list[int]) -> None:
        self._check_match(tokens)

    @rule(tokens=TOKENS)
    def pin(self, tokens: list[int]) -> None:
        node = self._check_match(tokens).last_node
        self.cache.lock(node)
        self.pins.append(node)

    @precondition(lambda self: self.pins)
    @rule(i=st.integers(0, 7))
    def unpin(self, i: int) -> None:
        self.cache.unlock(self.pins.pop(i % len(self.pins)))

    @rule(n=st.integers(0, NUM_PAGES))
    def evict(self, n: int) -> None:
        before = self.alloc.num_free
        freed = self.cache.evict(n)
        assert 0 <= freed and self.alloc.num_free == before + freed
        # Falling short means every unlocked node went, the rest being pages requests still hold.
        assert freed >= n or self.cache.num_evictable_pages == 0

    @rule()
    def reset(self) -> None:
        self.cache.reset()
        live = self.reqs or self.pins
        assert self.cache.num_evictable_pages == 0
        if not live:
            assert self.cache.num_cached_pages == 0

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        cache, alloc, ps = self.cache, self.alloc, self.ps
        cache.check_invariants()
        # Exact reference counts: one per holder, so nothing is lost or duplicated.
        expected: dict[int, int] = {p: 1 for p in cache._pages}
        for r in self.reqs:
            for p in r.pages:
                expected[p] = expected.get(p, 0) + 1
        assert alloc.num_free + len(expected) == alloc.num_pages
        assert all(alloc.ref_count(p) == c for p, c in expected.items())
        # Locks: every live holder's path is still in the tree, and the root counts every lock.
        holders = [r.node for r in self.reqs] + self.pins
        assert cache.root.lock_ref == len(holders)
        for node in holders:
            n = node
            while n is not cache.root:
                assert n.attached and n.lock_ref > 0
                n = n.parent
        # Contents: each cached page holds the tokens of its place in the tree.
        for node in cache._nodes():
            for i, page in enumerate(node.pages):
                assert self.shadow[page][:ps] == node.key[i * ps : (i + 1) * ps]
        for r in self.reqs:
            for j, page in enumerate(r.pages):
                assert self.shadow[page] == tuple(r.tokens[j * ps : (j + 1) * ps])


CacheMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheMachine = CacheMachine.TestCase
