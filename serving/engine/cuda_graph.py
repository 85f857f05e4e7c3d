"""CUDA graphs of the decode forward, one per batch-size bucket (nano-vllm's approach).

A decode step of a 47-layer MoE model is thousands of small kernels; launched one by one from
Python, the GPU waits on the host for most of the step. Captured once at start-up and replayed,
the whole forward (embedding to logits) is one launch. A batch runs in the smallest bucket that
holds it; the padding rows store nothing (slot -1), see no keys (length 0) and read the block
table's all-zero padding row, and their logits are dropped. Graphs share one memory pool, captured
largest first so the smaller ones fit inside its allocations.

The graphs read fixed input buffers: `inputs` [5, max_batch] int32 rows are input ids, positions,
slots, key counts and block-table rows. A step copies its packed rows into them (one device copy)
and replays. Prefill and mixed steps stay eager.
"""

from __future__ import annotations

import torch

from model.context import ForwardContext
from model.dsa import DSAForCausalLM
from model.kv_cache import KVCache
from serving.engine.step_state import BlockTables

IDS, POS, SLOTS, LENS, ROWS = range(5)


def buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


def pad_rows(rows: list[list[int]], bucket_size: int, width: int, pad_row: int) -> list[int]:
    """The five decode input rows of a batch, each padded to `width` columns (flat)."""
    fill = (0, 0, -1, 0, pad_row)
    out: list[int] = []
    for r, f in zip(rows, fill, strict=True):
        out.extend(r)
        out.extend([f] * (width - len(r)))
    return out


class DecodeGraphs:
    def __init__(self, model: DSAForCausalLM, cache: KVCache, tables: BlockTables, max_batch: int):
        self.model, self.cache, self.tables = model, cache, tables
        self.max_batch = max_batch
        dev = model.device
        self.inputs = torch.zeros(5, max_batch, dtype=torch.int32, device=dev)
        self.inputs[SLOTS] = -1
        self.inputs[ROWS] = tables.pad_row
        self._cu = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.buckets = buckets(max_batch)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.pool_bytes = 0
        self.replays = 0  # steps served by a graph (tests and metrics read it)

    def capture(self) -> None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.buckets):
                self._forward(bs)  # warm-up: compiles kernels, fills lazily built constants
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._logits[bs] = self._forward(bs)
                pool = g.pool()
                self._graphs[bs] = g
        torch.cuda.synchronize()
        self.pool_bytes = torch.cuda.memory_reserved() - before

    def _forward(self, bs: int) -> torch.Tensor:
        inp = self.inputs[:, :bs]
        ctx = ForwardContext(
            positions=inp[POS],
            cu_seqlens_q=self._cu[: bs + 1],
            seq_lens=inp[LENS],
            block_tables=self.tables.table.index_select(0, inp[ROWS]),
            slot_mapping=inp[SLOTS],
            cache=self.cache,
            is_decode=True,
        )
        return self.model(inp[IDS], ctx)

    def bucket(self, bs: int) -> int | None:
        """The smallest captured batch holding `bs` rows (None: too big, run eagerly)."""
        for b in self.buckets:
            if b >= bs:
                return b
        return None

    def replay(self, packed: torch.Tensor, bs: int) -> torch.Tensor:
        """`packed`: the step's [5 * max_batch] decode rows on the device -> logits [bs, V]."""
        b = self.bucket(bs)
        self.inputs.copy_(packed.view(5, self.max_batch))
        self._graphs[b].replay()
        self.replays += 1
        return self._logits[b][:bs]
