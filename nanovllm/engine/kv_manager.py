"""Pages for requests: growing page tables, freeing them, and (with prefix caching) reusing cached prefixes."""
from __future__ import annotations

from nanovllm.engine.kv_cache import PageAllocator
from nanovllm.engine.request import Request


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False) -> None:
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = None

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, request: Request) -> None:
        """Give a request with no pages the longest cached prefix of its tokens (a no-op without the cache)."""

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the page table to hold ``num_tokens`` tokens; False (and no change) if the pool is short."""
        missing = self.pages_for(num_tokens) - len(request.page_table)
        if missing <= 0:
            return True
        if self.allocator.num_free < missing:
            return False
        request.page_table.extend(self.allocator.allocate(missing))
        return True

    def cache_computed(self, request: Request) -> None:
        """Offer the request's computed full pages to the prefix cache (a no-op without the cache)."""

    def take_page_copies(self) -> list[tuple[int, int]]:
        """Page copies (src, dst) the executor must do before the next forward (copy-on-write prefix hits)."""
        return []

    def free(self, request: Request) -> None:
        """Release the request's pages; cached ones stay in the prefix cache for later hits."""
        self.allocator.decref(request.page_table)
        request.page_table = []
