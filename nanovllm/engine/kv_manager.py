"""Pages for requests: growing page tables, freeing them, and (with prefix caching) reusing cached prefixes.

With the prefix cache on, a request's computed full pages enter the radix tree after each prefill chunk and when
the request ends (finished, aborted or preempted), so later requests with the same prefix skip that prefill. A
request locks the deepest tree node it uses, so its pages are never evicted under it; unlocked pages are evicted,
least recently used first, when the allocator runs dry.
"""
from __future__ import annotations

from nanovllm.engine.kv_cache import PageAllocator
from nanovllm.engine.prefix_cache import RadixCache
from nanovllm.engine.request import PLACEHOLDER, Request


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False) -> None:
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = RadixCache(self.allocator, page_size) if enable_prefix_caching else None
        self._page_copies: list[tuple[int, int]] = []

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, request: Request) -> None:
        """Give a request with no pages the longest cached prefix of its tokens.

        At least the last token is left to compute, so there are logits to sample from. A hit that ends inside a
        cached page is copied into a fresh page (the copy runs before the next forward); cached pages are never
        written. Requests asking for prompt logprobs match nothing: skipped tokens would have no logits."""
        cache = self.prefix_cache
        if cache is None or request.sampling_params.prompt_logprobs is not None:
            return
        tokens = _known_tokens(request)[: request.num_tokens - 1]
        match = cache.match(tokens)
        computed = match.num_tokens
        if computed > 0 or match.partial_tokens > 0:
            cache.lock(match.last_node)
            request.prefix_node = match.last_node
            self.allocator.incref(match.pages)
            request.set_page_table(list(match.pages))
            if match.partial_page is not None and self.allocator.num_free > 0:
                page = self.allocator.allocate(1)[0]
                request.page_table.append(page)
                self._page_copies.append((match.partial_page, page))
                computed += match.partial_tokens
        request.num_computed_tokens = computed
        if request.num_cached_tokens < 0:  # count first admissions only, not readmissions after preemption
            cache.record(request.num_prompt_tokens, min(computed, request.num_prompt_tokens))

    def is_cached(self, tokens: tuple[int, ...]) -> bool:
        """Whether the cache holds these tokens (a page-aligned run) from the start."""
        return self.prefix_cache is not None and self.prefix_cache.match(tokens).num_tokens >= len(tokens)

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the page table to hold ``num_tokens`` tokens; False (and no change) if the pool is short even
        after evicting unused cached pages."""
        missing = self.pages_for(num_tokens) - len(request.page_table)
        if missing <= 0:
            return True
        short = missing - self.allocator.num_free
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        if self.allocator.num_free < missing:
            return False
        request.page_table.extend(self.allocator.allocate(missing))
        return True

    def cache_computed(self, request: Request, num_tokens: int) -> None:
        """Offer the first ``num_tokens`` tokens' full pages (their KV computed) to the prefix cache."""
        cache = self.prefix_cache
        if cache is None or not request.page_table:
            return
        tokens = _known_tokens(request)[:num_tokens]
        if len(tokens) < self.page_size:
            return
        result = cache.insert(tokens, request.page_table)
        cache.lock(result.node)
        if request.prefix_node is not None:
            cache.unlock(request.prefix_node)
        request.prefix_node = result.node

    def take_page_copies(self) -> list[tuple[int, int]]:
        """Page copies (src, dst) the executor must do before the next forward (copy-on-write prefix hits)."""
        copies, self._page_copies = self._page_copies, []
        return copies

    def free(self, request: Request) -> None:
        """Release the request's pages; its computed full pages stay in the prefix cache for later hits."""
        if self.prefix_cache is not None:
            self.cache_computed(request, request.num_computed_tokens)
            if request.prefix_node is not None:
                self.prefix_cache.unlock(request.prefix_node)
                request.prefix_node = None
        if self._page_copies:  # a copy into a page given back unused (the request was not admitted)
            released = set(request.page_table)
            self._page_copies = [(s, d) for s, d in self._page_copies if d not in released]
        self.allocator.decref(request.page_table)
        request.set_page_table([])

    @property
    def num_used_pages(self) -> int:
        """Pages held by requests or the cache."""
        return self.allocator.num_used


def _known_tokens(request: Request) -> list[int]:
    """The request's tokens up to the first one still on the device."""
    tokens = request.token_ids
    if PLACEHOLDER in tokens:
        return tokens[: tokens.index(PLACEHOLDER)]
    return tokens
