"""Per-forward metadata, passed explicitly through every layer (never a global).

Tokens of all sequences in the step are packed: T rows, sequence b owns rows
cu_seqlens_q[b]:cu_seqlens_q[b+1], and those are its last tokens (cached prefix first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.indexer import PrefillTiles
from model.kv_cache import KVCache


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int32/int64 absolute position of each query token
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32 keys per sequence after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int32/int64 cache slot of each new token (-1: do not store)
    cache: KVCache
    is_decode: bool = False  # every sequence has exactly one query: decode kernels apply
    logits_indices: torch.Tensor | None = None  # rows to compute logits for (None: all)
    # Written by F layers, read by the S layers after them within this same forward.
    topk: torch.Tensor | None = None  # [T, index_topk] int32 logical positions, -1 padded
    rope: dict = field(default_factory=dict)  # rotary dim -> (cos, sin) for `positions`
    # F layers that act as S layers for this forward (their indexer is not called, they reuse
    # ctx.topk): lets calibration score any F/S plan on one all-F model without rebuilding it.
    skip_indexer: frozenset[int] = frozenset()
    # The prefill indexer's launch plan for this forward, made once by the engine for all F
    # layers (None: each layer derives it, reading the lengths back to the host).
    indexer_plan: PrefillTiles | None = None

    @classmethod
    def for_batch(
        cls,
        seqs_new: list[int],
        seqs_cached: list[int],
        block_tables: torch.Tensor,
        cache: KVCache,
        logits_indices: torch.Tensor | None = None,
    ) -> ForwardContext:
        """Build the tensors from per-sequence (new, cached) token counts and page tables, for
        one-shot use (calibration, scratch forwards); the engine builds its own from flat lists
        (serving/engine/model_runner.py)."""
        device = block_tables.device
        ps = cache.layout.page_size
        pairs = list(zip(seqs_new, seqs_cached, strict=True))
        pos = torch.cat([torch.arange(c, c + n) for n, c in pairs]) if pairs else torch.zeros(0)
        seq = torch.repeat_interleave(torch.arange(len(pairs)), torch.tensor(seqs_new))
        pos, seq = pos.long().to(device), seq.to(device)
        cu = torch.zeros(len(pairs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqs_new, dtype=torch.int32).cumsum(0)
        return cls(
            positions=pos,
            cu_seqlens_q=cu.to(device),
            seq_lens=torch.tensor([n + c for n, c in pairs], dtype=torch.int32, device=device),
            block_tables=block_tables.to(torch.int32),
            slot_mapping=block_tables[seq, pos // ps].long() * ps + pos % ps,
            cache=cache,
            is_decode=all(n == 1 for n in seqs_new),
            logits_indices=logits_indices,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])
