"""Step state on the device: the persistent block table and one pinned copy per step.

Block tables: the device keeps one row of page ids per running sequence for as long as it holds
pages, and a step writes only the entries of pages a sequence gained since its last step (a
decoding sequence gains one page every 64 tokens). Rebuilding every table from Python lists each
step cost more than the forward at large batches.

Everything else a forward needs (input ids, positions, slot mapping, query offsets, key counts,
table rows, logits rows, the indexer's tile plan, the table updates) is built on the host as flat
int lists, written into one pinned int32 buffer and moved with one non-blocking copy; the
forward's tensors are views of the device copy. Two pinned buffers alternate and each waits for
its own previous copy before it is refilled, so a step that never syncs (a prefill chunk that
samples nothing) cannot race the next step's writes.
"""

from __future__ import annotations

import numpy as np
import torch


class BlockTables:
    def __init__(self, max_rows: int, max_pages: int, device: torch.device):
        self.max_pages = max_pages
        # The extra last row stays all zeros: padding rows of a CUDA-graph batch point at it.
        self.table = torch.zeros(max_rows + 1, max_pages, dtype=torch.int32, device=device)
        self.pad_row = max_rows
        self._free = list(range(max_rows - 1, -1, -1))
        self._row: dict[str, int] = {}
        self._synced: dict[str, int] = {}  # pages of the sequence already on the device

    def rows_and_updates(self, seqs) -> tuple[list[int], list[int], list[int]]:
        """-> (table row of each sequence, flat table indices to write, page ids to write)."""
        rows, idx, pages = [], [], []
        mp = self.max_pages
        for seq in seqs:
            rid, have = seq.request_id, seq.pages
            row = self._row.get(rid)
            if row is None:
                if not self._free:
                    raise RuntimeError("block tables: more running sequences than max_num_seqs")
                row = self._row[rid] = self._free.pop()
                self._synced[rid] = 0
            done = self._synced[rid]
            if len(have) < done:  # pages were replaced without a release: write them all again
                done = 0
            if len(have) > mp:
                raise RuntimeError(f"{rid} holds {len(have)} pages, the table has {mp} columns")
            if len(have) > done:
                base = row * mp
                idx.extend(range(base + done, base + len(have)))
                pages.extend(have[done:])
                self._synced[rid] = len(have)
            rows.append(row)
        return rows, idx, pages

    def release(self, request_id: str) -> None:
        """The sequence's pages were freed: its row may be reused (idempotent)."""
        row = self._row.pop(request_id, None)
        if row is not None:
            self._synced.pop(request_id, None)
            self._free.append(row)

    def apply(self, idx: torch.Tensor, pages: torch.Tensor) -> None:
        if idx.numel():
            self.table.view(-1).index_copy_(0, idx.long(), pages)

    @property
    def num_rows_in_use(self) -> int:
        return len(self._row)


class StepPacker:
    """Flat int lists -> device int32 views, through one pinned host-to-device copy."""

    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = device
        self.pinned = device.type == "cuda"
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self._host = [
            torch.empty(capacity, dtype=torch.int32, pin_memory=self.pinned) for _ in range(2)
        ]
        self._events = [torch.cuda.Event() if self.pinned else None for _ in range(2)]
        self._dev = torch.empty(capacity, dtype=torch.int32, device=self.device)
        self._i = 0

    def pack(self, segments: dict[str, list[int] | np.ndarray]) -> dict[str, torch.Tensor]:
        total = sum(len(v) for v in segments.values())
        if total > self.capacity:
            if self.pinned:
                torch.cuda.current_stream(self.device).synchronize()  # old buffers may be in use
            self._alloc(max(total, 2 * self.capacity))
        i, self._i = self._i, 1 - self._i
        host, event = self._host[i], self._events[i]
        if event is not None:
            event.synchronize()  # this buffer's previous copy has landed
        flat = host.numpy()
        off, spans = 0, {}
        for name, vals in segments.items():
            n = len(vals)
            flat[off : off + n] = vals
            spans[name] = (off, n)
            off += n
        # Each step's device copy must not overwrite one still being read: the forward that read
        # the previous step's views is queued on the same stream before this copy, so stream
        # order protects it.
        self._dev[:off].copy_(host[:off], non_blocking=self.pinned)
        if event is not None:
            event.record()
        return {name: self._dev[o : o + n] for name, (o, n) in spans.items()}
