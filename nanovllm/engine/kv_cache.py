"""The KV page allocator: a free list and a reference count per page.

A page is free exactly when its count is zero. Each holder takes one reference: a request for every page in its
page table, the prefix cache for every page it stores. Pages are plain integers; the tensors live in the executor.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable


class OutOfPagesError(RuntimeError):
    pass


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be > 0, got {num_pages}")
        self.num_pages = num_pages
        self._ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free pages, each with one reference."""
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self._ref_counts[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for page in pages:
            if self._ref_counts[page] <= 0:
                raise RuntimeError(f"incref on free page {page}")
            self._ref_counts[page] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference from each page; return how many pages became free."""
        freed = 0
        for page in pages:
            count = self._ref_counts[page]
            if count <= 0:
                raise RuntimeError(f"decref on free page {page}")
            self._ref_counts[page] = count - 1
            if count == 1:
                self._free.append(page)
                freed += 1
        return freed
