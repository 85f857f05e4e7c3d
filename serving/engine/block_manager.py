"""Page allocator over the KV pool: a sequence owns whole pages of `page_size` token slots.

Pages are handed out from a free list (LIFO, so recently freed pages are reused while warm). A
sequence's page list grows as its token count grows and is returned in full on finish, abort or
preemption; nothing is ever partially freed, so an empty pool after all requests end is exact.
"""

from __future__ import annotations

from collections.abc import Callable

from serving.engine.sequence import Sequence


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        page_size: int,
        on_free: Callable[[str], None] | None = None,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks, self.page_size = num_blocks, page_size
        self.on_free = on_free  # told the request id whenever a sequence gives its pages back
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out page 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold `num_tokens` tokens in total."""
        return max(pages_for(num_tokens, self.page_size) - len(seq.pages), 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s pages to hold `num_tokens` tokens (call can_allocate first)."""
        n = self.pages_needed(seq, num_tokens)
        if n > len(self._free):
            raise RuntimeError(
                f"KV pool exhausted: {seq.request_id} needs {n} pages, {len(self._free)} free"
            )
        seq.pages.extend(self._free.pop() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.pages))
        seq.pages = []
        if self.on_free is not None:
            self.on_free(seq.request_id)
