"""Copies between the KV pool and a payload's flat tensor, off the engine step's critical path.

Export gathers a sequence's rows from its pages into one host tensor; import scatters a
payload's rows into pages reserved for it. On CUDA both are issued on a side stream (the export
first waits for the main stream, whose forward wrote the rows) and the call returns at once; a
`Copy` is the event the engine polls between steps, so neither side stalls its running streams
for the copy. The export's host tensor is pinned (one allocation per payload; the device-to-host
copies into it are asynchronous); an import's source should be pinned too (the async engine pins
a pulled payload off the engine thread), or the driver stages it synchronously. On CPU the
copies run at once: there is nothing to overlap, and the code path is the same.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from model.kv_cache import KVCache
from serving.engine.payload import KVHeader, KVPayload, Part, parts, view


class Copy:
    """A copy in flight (CUDA) or done (CPU)."""

    def __init__(self, event: torch.cuda.Event | None = None):
        self.event = event

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def slots_of(pages: list[int], n: int, page_size: int, device) -> torch.Tensor:
    """Pool slot of each of the first n tokens of `pages`, on `device`. Built on the host and
    moved from pinned memory: a copy from pageable memory would first wait for the side stream,
    i.e. for the copies still in flight, on the engine thread."""
    pos = np.arange(n)
    host = torch.from_numpy(np.asarray(pages, dtype=np.int64)[pos // page_size] * page_size)
    host += torch.from_numpy(pos % page_size)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class KVCopier:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.device = cache.k[0].device
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None

    @contextmanager
    def _side(self, wait_main: bool):
        """Run the body on the side stream (CUDA); yields a Copy whose event is recorded after."""
        copy = Copy()
        if self.stream is None:
            yield copy
            return
        if wait_main:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield copy
        copy.event = torch.cuda.Event()
        copy.event.record(self.stream)

    def export(self, pages: list[int], header: KVHeader) -> tuple[KVPayload, Copy]:
        """Stage the header's rows (the first `num_tokens` of `pages`) into one host tensor."""
        pinned = self.stream is not None
        data = torch.empty(header.nbytes, dtype=torch.uint8, pin_memory=pinned)
        payload = KVPayload(header, data)
        with torch.no_grad(), self._side(wait_main=True) as copy:
            slots = slots_of(pages, header.num_tokens, self.cache.layout.page_size, self.device)
            for p, dst in payload.views():
                dst.copy_(self._gather(p, slots), non_blocking=pinned)
        return payload, copy

    def _gather(self, p: Part, slots: torch.Tensor) -> torch.Tensor:
        c = self.cache

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, *t.shape[2:])[slots]  # [P, PS, *R] -> [n, *R]

        if p.kind == "attn":
            if c.layout.attn_kind == "mla":
                return rows(c.k[p.layer])
            return torch.cat([rows(c.k[p.layer]), rows(c.v[p.layer])], -1)
        if p.kind == "index_k":
            return rows(c.index_k[p.layer])
        return rows(c.index_scale[p.layer])

    def import_(self, pages: list[int], payload: KVPayload, start: int) -> Copy:
        """Write the payload's rows from `start` on into `pages` (reserved for its tokens); rows
        before `start` are there already (pages shared from the prefix cache)."""
        c, lay = self.cache, self.cache.layout
        # The main stream never touches these pages before the import completes (the sequence
        # is not scheduled until then), so the side stream need not wait for it.
        with torch.no_grad(), self._side(wait_main=False) as copy:
            slots = slots_of(pages, payload.num_tokens, lay.page_size, self.device)[start:]

            def put(dst: torch.Tensor, rows: torch.Tensor) -> None:
                dst.view(-1, *dst.shape[2:])[slots] = rows

            for p in parts(payload.header.layout, payload.num_tokens):
                # Part by part: the device holds one layer's rows in transit, not the payload.
                rows = view(payload.data, p)[start:].to(self.device, non_blocking=True)
                if p.kind == "attn" and lay.attn_kind == "gqa":
                    put(c.k[p.layer], rows[..., : lay.k_dim])
                    put(c.v[p.layer], rows[..., lay.k_dim :])
                elif p.kind == "attn":
                    put(c.k[p.layer], rows)
                elif p.kind == "index_k":
                    put(c.index_k[p.layer], rows)
                else:
                    put(c.index_scale[p.layer], rows)
        return copy
