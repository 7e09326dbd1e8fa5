"""Radix prefix cache: a tree over token ids whose nodes own runs of full KV pages.

Structure. Every non-root node holds ``key`` (a token tuple whose length is a multiple of ``page_size``) and one page
id per ``page_size`` tokens of it. A node's children are keyed by their first page of tokens, so one dict lookup per
node finds the way down and a lookup costs O(depth). Only full pages are cached: a partly filled page may still be
written by its request, and a cached page is never written in place (a partial hit is copied on write instead).

Ownership. The tree holds one allocator reference on every page it stores (taken in ``insert``, dropped in
``evict``/``reset``). A request holds its own reference on every page of its page table, matched ones included, and
one ``lock`` on the deepest tree node it uses; locks count along the whole path to the root, and locked nodes are
never evicted. ``match`` takes neither references nor locks: the caller locks the returned node before anything can
evict (in particular before calling ``evict`` to make room for the rest of the request).

Splitting a node keeps the original object as the lower part, so a handle a request has locked (the deepest node)
keeps naming the end of its path and its lock still covers every page above it.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Sequence

from nanovllm.engine.kv_cache import PageAllocator


@dataclass(eq=False, slots=True)
class RadixNode:
    key: tuple[int, ...]
    pages: list[int]
    parent: RadixNode | None = field(default=None, repr=False)
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict, repr=False)
    lock_ref: int = 0
    last_access: int = 0  # logical clock: deterministic, and ties are impossible within one walk
    attached: bool = True  # False once evicted, so a stale handle is caught instead of silently locked


@dataclass
class PrefixMatch:
    pages: list[int]  # cached pages of the longest page-aligned prefix, in order
    num_tokens: int  # len(pages) * page_size
    last_node: RadixNode  # deepest node of the match (the root when nothing matched); lock this
    partial_page: int | None = None  # cached page whose first partial_tokens tokens continue the query
    partial_tokens: int = 0


@dataclass
class InsertResult:
    num_cached_tokens: int  # tokens of the path that were cached before this insert
    node: RadixNode  # deepest node of the inserted path (the root if tokens held no full page)
    pages: list[int]  # the tree's page for each full page of tokens; may differ from the caller's duplicates


@dataclass
class PrefixCacheStats:
    num_queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.root = RadixNode(key=(), pages=[])
        self.stats = PrefixCacheStats()
        self._pages: set[int] = set()  # every page the tree holds a reference on
        self._num_locked_pages = 0
        self._clock = itertools.count(1)

    # -- introspection -------------------------------------------------------------------------------------------

    @property
    def num_cached_pages(self) -> int:
        return len(self._pages)

    @property
    def num_evictable_pages(self) -> int:
        """Pages in unlocked nodes: what ``evict`` could drop (it frees those no request also holds)."""
        return len(self._pages) - self._num_locked_pages

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """Count one lookup. Kept apart from ``match`` because a waiting request may be matched on many steps
        before it is admitted, and only the admission should count."""
        self.stats.num_queries += 1
        self.stats.query_tokens += query_tokens
        self.stats.hit_tokens += hit_tokens

    # -- lookup and insertion ------------------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> PrefixMatch:
        """Longest cached page-aligned prefix of ``tokens``, plus the best partial page after it.

        The partial page is a cached page (a child of ``last_node``) whose first ``partial_tokens`` tokens equal the
        query's next tokens; the caller copies them into a page of its own. The total never exceeds len(tokens), and
        may equal it: a caller that needs at least one token to compute should match ``tokens[:-1]``.
        """
        ps = self.page_size
        query = tuple(tokens)
        node, pos, pages, now = self._walk(query)
        rest = query[pos : pos + ps]
        best: RadixNode | None = None
        best_k = 0
        if rest:
            # Siblings have distinct first pages but may share a shorter prefix, hence a scan for the longest.
            for child in node.children.values():
                k = _common_prefix_len(child.key, rest)
                if k > best_k:
                    best, best_k = child, k
        if best is not None:
            best.last_access = now
        return PrefixMatch(pages, pos, node, best.pages[0] if best is not None else None, best_k)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult:
        """Cache the full pages of ``tokens``; ``pages[i]`` holds tokens[i*ps:(i+1)*ps] (extra pages are ignored).

        Pages already cached for this path keep their tree page: the caller's copy is a duplicate on which the tree
        takes no reference, so it is freed when the caller drops its own reference. The tree increfs only the pages
        it newly stores, which the caller must hold (a free page raises). To keep the path, ``lock(result.node)``
        (and unlock the node the caller locked before, if any).
        """
        ps = self.page_size
        n = len(tokens) // ps
        if len(pages) < n:
            raise ValueError(f"{len(tokens)} tokens need {n} full pages, got {len(pages)}")
        path = tuple(tokens[: n * ps])
        node, pos, tree_pages, now = self._walk(path)
        new_pages = list(pages[pos // ps : n])
        if new_pages:
            if len(set(new_pages)) != len(new_pages) or not self._pages.isdisjoint(new_pages):
                raise ValueError(f"pages {new_pages} repeat or are already cached elsewhere in the tree")
            if any(self.allocator.ref_count(p) <= 0 for p in new_pages):
                raise ValueError(f"pages {new_pages} include a free page; the caller must hold its pages")
            self.allocator.incref(new_pages)
            self._pages.update(new_pages)
            leaf = RadixNode(key=path[pos:], pages=new_pages, parent=node, last_access=now)
            node.children[leaf.key[:ps]] = leaf  # _walk stopped because no child starts with this page
            node = leaf
        return InsertResult(pos, node, tree_pages + new_pages)

    def _walk(self, tokens: tuple[int, ...]) -> tuple[RadixNode, int, list[int], int]:
        """Descend along the full pages of ``tokens`` while they are cached, refreshing LRU time on the path.

        A node matched only in part is split so the returned node ends exactly at the matched length.
        Returns (node, matched tokens, matched pages, the time stamp used).
        """
        ps = self.page_size
        end = len(tokens) // ps * ps
        now = next(self._clock)
        node, pos, pages = self.root, 0, []
        node.last_access = now
        while pos < end:
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            m = 1  # the first page matched through the dict key
            while (
                m < len(child.pages)
                and pos + (m + 1) * ps <= end
                and child.key[m * ps : (m + 1) * ps] == tokens[pos + m * ps : pos + (m + 1) * ps]
            ):
                m += 1
            if m < len(child.pages):
                child = self._split(child, m)
            child.last_access = now
            pages.extend(child.pages)
            pos += m * ps
            node = child
        return node, pos, pages, now

    def _split(self, node: RadixNode, num_pages: int) -> RadixNode:
        """Cut ``node`` after its first ``num_pages`` pages; return the new upper part.

        Pages move between nodes without changing owners, so no refcount changes. The upper part inherits the lock
        count, since every lock through ``node`` passes through it.
        """
        ps = self.page_size
        parent = node.parent
        assert parent is not None, "the root is never split"
        cut = num_pages * ps
        upper = RadixNode(
            key=node.key[:cut], pages=node.pages[:num_pages], parent=parent,
            lock_ref=node.lock_ref, last_access=node.last_access,
        )
        parent.children[upper.key[:ps]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[num_pages:], upper
        upper.children[node.key[:ps]] = node
        return upper

    # -- locking and eviction ------------------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Pin the path root..node against eviction (one count per call; pair each with ``unlock``)."""
        if not node.attached:
            raise RuntimeError("lock on an evicted node: lock the match result before anything evicts")
        n: RadixNode | None = node
        while n is not None:
            if n.lock_ref == 0:
                self._num_locked_pages += len(n.pages)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: RadixNode) -> None:
        if node.lock_ref <= 0:  # parents count at least as much, so checking the node covers the path
            raise RuntimeError("unlock of a node that is not locked")
        n: RadixNode | None = node
        while n is not None:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._num_locked_pages -= len(n.pages)
            n = n.parent

    def evict(self, num_pages: int) -> int:
        """Drop least-recently-used unlocked leaves until ``num_pages`` pages became free; return how many did.

        Policy: any unlocked leaf may go, even if a request still holds one of its pages (such a page just stops
        being cached and is freed when the request lets go); only actual frees count toward ``num_pages``. A leaf
        bigger than what is still needed loses only its tail pages, so one request's need does not wipe a long
        cached prompt. Parents that become unlocked leaves join the candidates. O(tree) to collect the leaves.
        """
        ps = self.page_size
        tiebreak = itertools.count()
        heap = [(n.last_access, next(tiebreak), n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            need = num_pages - freed
            if need < len(node.pages):
                drop = node.pages[-need:]
                del node.pages[-need:]
                node.key = node.key[: len(node.pages) * ps]
                heapq.heappush(heap, (node.last_access, next(tiebreak), node))
            else:
                drop = node.pages
                parent = node.parent
                assert parent is not None
                del parent.children[node.key[:ps]]
                node.parent, node.attached = None, False
                if parent is not self.root and not parent.children and parent.lock_ref == 0:
                    heapq.heappush(heap, (parent.last_access, next(tiebreak), parent))
            self._pages.difference_update(drop)
            freed += self.allocator.decref(drop)
        return freed

    def reset(self) -> int:
        """Drop every unlocked node (all of the tree when nothing runs); return the pages freed."""
        # Every unlocked node's subtree is unlocked, so repeatedly evicting leaves reaches all of them, and asking
        # for every cached page means no leaf is ever trimmed.
        return self.evict(len(self._pages))

    def _nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree is inconsistent (for tests; walks the whole tree)."""
        ps = self.page_size
        seen: set[int] = set()
        locked_pages = 0
        for node in self._nodes():
            parent = node.parent
            if parent is None or not node.attached:
                raise AssertionError("detached node reachable from the root")
            _check(parent.children.get(node.key[:ps]) is node, "child not filed under its first page")
            _check(len(node.key) % ps == 0 and len(node.key) // ps == len(node.pages) >= 1, "key/pages mismatch")
            _check(0 <= node.lock_ref <= parent.lock_ref, f"lock refs {node.lock_ref} > parent {parent.lock_ref}")
            for page in node.pages:
                _check(page not in seen, f"page {page} stored twice")
                _check(self.allocator.ref_count(page) >= 1, f"cached page {page} is free")
                seen.add(page)
            locked_pages += len(node.pages) if node.lock_ref > 0 else 0
        _check(self.root.lock_ref >= 0 and not self.root.pages, "bad root")
        _check(seen == self._pages, "page set out of sync with the tree")
        _check(locked_pages == self._num_locked_pages, "locked page count out of sync")


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)
