"""Page allocator over the KV pool, with reference counts and the prefix cache.

A sequence holds `seq.pages` in order; `seq.pages[i]` stores its tokens [i*page_size,
(i+1)*page_size). With prefix caching (a `root` hash given), every full page a sequence has
computed is registered under its chain hash (prefix_cache.py), and an admitted sequence starts
from the longest cached prefix: those pages are shared (reference count + 1), never written
again (the sequence only writes positions after them), and its `num_cached` starts after them.

A page is in exactly one state: free (no content), referenced (by one or more sequences), or
cached-and-unreferenced (parked in the prefix index's LRU, reusable by a hit, evicted when the
free list runs dry). `num_free` counts the last two kinds as allocatable; `num_used` counts
referenced pages only, so a full cache does not look like a full pool.
"""

from __future__ import annotations

from collections.abc import Callable

from serving.engine.prefix_cache import PrefixIndex, extend_hashes
from serving.engine.sequence import Sequence


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        page_size: int,
        root: bytes | None = None,
        on_free: Callable[[str], None] | None = None,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks, self.page_size = num_blocks, page_size
        self.root = root  # None: prefix caching off
        self.on_free = on_free  # told the request id whenever a sequence gives its pages back
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out page 0 first
        self._ref = [0] * num_blocks
        self.index = PrefixIndex()

    @property
    def caching(self) -> bool:
        return self.root is not None

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: free ones, then cached ones nobody references."""
        return len(self._free) + len(self.index.lru)

    @property
    def num_used(self) -> int:
        """Pages some sequence references."""
        return self.num_blocks - self.num_free

    @property
    def num_cached_free(self) -> int:
        """Unreferenced pages that still hold a cached prefix."""
        return len(self.index.lru)

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache, referenced or not."""
        return len(self.index)

    # -- allocation ------------------------------------------------------------------------
    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold `num_tokens` tokens in total."""
        return max(pages_for(num_tokens, self.page_size) - len(seq.pages), 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s pages to hold `num_tokens` tokens (call can_allocate first)."""
        n = self.pages_needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(
                f"KV pool exhausted: {seq.request_id} needs {n} pages, {self.num_free} free"
            )
        for _ in range(n):
            page = self._free.pop() if self._free else self.index.evict()
            self._ref[page] = 1
            seq.pages.append(page)

    # -- prefix cache ----------------------------------------------------------------------
    def match(self, seq: Sequence, max_pages: int) -> list[int]:
        """Cached pages of `seq`'s longest cached prefix, at most `max_pages` (no side effects)."""
        if self.root is None or max_pages <= 0:
            return []
        hashes = extend_hashes(seq.page_hashes, seq.token_ids, self.page_size, self.root, max_pages)
        return self.index.lookup(hashes[:max_pages])

    def probe(self, token_ids: list[int]) -> int:
        """Tokens of a prompt that admission would find cached now (read-only, any thread)."""
        if self.root is None:
            return 0
        n = (len(token_ids) - 1) // self.page_size
        hashes = extend_hashes([], list(token_ids), self.page_size, self.root, n)
        return len(self.index.lookup(hashes)) * self.page_size

    def admit(self, seq: Sequence, num_tokens: int, max_hit_pages: int, reserve: int = 0) -> bool:
        """Give a page-less `seq` pages for `num_tokens` tokens, starting from its cached prefix
        (at most `max_hit_pages` pages), while `reserve` pages stay allocatable afterwards.
        Sets `seq.num_cached` to the reused tokens. False (nothing changed) when it does not fit."""
        assert not seq.pages, f"{seq.request_id} already holds pages"
        hit = self.match(seq, max_hit_pages)
        parked = sum(1 for p in hit if self._ref[p] == 0)  # they stop being allocatable
        need = pages_for(num_tokens, self.page_size) - len(hit)
        if need + parked + reserve > self.num_free:
            return False
        for p in hit:
            if self._ref[p] == 0:
                self.index.unpark(p)
            self._ref[p] += 1
        seq.pages = list(hit)
        seq.num_committed = len(hit)
        seq.num_cached = len(hit) * self.page_size
        self.allocate(seq, num_tokens)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the full pages `seq` has computed since the last commit."""
        if self.root is None:
            return
        full = min(seq.num_cached // self.page_size, len(seq.pages))
        if full <= seq.num_committed:
            return
        extend_hashes(seq.page_hashes, seq.token_ids, self.page_size, self.root, full)
        for i in range(seq.num_committed, full):
            self.index.register(seq.page_hashes[i], seq.pages[i])
        seq.num_committed = full

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its computed full pages stay cached for later hits. Tail pages
        are parked first, so they are evicted before the shared head of a prefix."""
        self.commit(seq)
        for page in reversed(seq.pages):
            self._ref[page] -= 1
            if self._ref[page] > 0:
                continue
            if self.index.is_cached(page):
                self.index.park(page)
            else:
                self._free.append(page)
        seq.pages = []
        seq.num_committed = 0
        if self.on_free is not None:
            self.on_free(seq.request_id)

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError unless every page is in exactly one state (tests, debugging)."""
        free, parked = set(self._free), set(self.index.lru)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & parked, f"pages both free and cached: {sorted(free & parked)}"
        for p in range(self.num_blocks):
            in_use = self._ref[p] > 0
            assert self._ref[p] >= 0, f"page {p} has reference count {self._ref[p]}"
            assert in_use + (p in free) + (p in parked) == 1, f"page {p} is in no or two states"
            if p in parked or p in free:
                assert (p in parked) == self.index.is_cached(p), f"page {p} cache state"
        for h, p in self.index.page_of.items():
            assert self.index.hash_of[p] == h, f"page {p}: index out of sync"
