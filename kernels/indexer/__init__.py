"""Lightning-indexer scores + causal top-k over a paged indexer key cache.

Score of query t (head weights w[t, h], all scales folded in) against key s (dsa.md 1.6):

    I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h, :] . k[s, :])      for s <= pos(t)

Shapes: T packed query tokens, B sequences, HI/DI indexer heads/dim, P pages of PS tokens.
  q             [T, HI, DI]   bf16 / fp16 / fp32, or float8_e4m3fn
  weights       [T, HI]       fp32 (HI^-0.5 * DI^-0.5 * q_scale folded in)
  k_cache       [P, PS, DI]   same dtype family as q
  k_scale       [P, PS] fp32 per-key scale, or None (bf16 path)
  block_tables  [B, max_pages] int32, page ids of each sequence in order
  cu_seqlens_q  [B + 1] int32, query tokens of sequence b are rows cu[b]:cu[b+1]
  seq_lens      [B] int32, keys of sequence b after this step (cached + new); the queries are its
                last tokens, so query i of sequence b sits at position seq_lens[b] - n_q[b] + i.
Output: int32 [T, topk] of logical key positions (0-based within the sequence), the
min(topk, pos + 1) best keys of each row in any order, then -1 padding.
"""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.indexer import ref
from kernels.indexer.plan import PrefillTiles

__all__ = ["PrefillTiles", "indexer_topk_prefill", "indexer_topk_decode"]


def _validate(q, weights, k_cache, k_scale, block_tables, seq_lens, topk):
    if q.dim() != 3:
        raise ValueError(f"indexer: q must be [T, HI, DI], got {tuple(q.shape)}")
    t, hi, di = q.shape
    if weights.shape != (t, hi) or weights.dtype != torch.float32:
        raise ValueError(
            f"indexer: weights must be fp32 [T={t}, HI={hi}], got "
            f"{tuple(weights.shape)} {weights.dtype}"
        )
    if k_cache.dim() != 3 or k_cache.shape[2] != di:
        raise ValueError(f"indexer: k_cache must be [P, PS, DI={di}], got {tuple(k_cache.shape)}")
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8 != (k_cache.dtype == torch.float8_e4m3fn) or fp8 != (k_scale is not None):
        raise ValueError(
            "indexer: FP8 needs q, k_cache in float8_e4m3fn and a k_scale; "
            f"got q {q.dtype}, k_cache {k_cache.dtype}, k_scale {k_scale is not None}"
        )
    if k_scale is not None and k_scale.shape != k_cache.shape[:2]:
        raise ValueError(f"indexer: k_scale must be [P, PS], got {tuple(k_scale.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"indexer: block_tables [B, max_pages] and seq_lens [B] disagree: "
            f"{tuple(block_tables.shape)} vs {tuple(seq_lens.shape)}"
        )
    if topk < 1:
        raise ValueError(f"indexer: topk must be >= 1, got {topk}")


def indexer_topk_prefill(
    q,
    weights,
    k_cache,
    k_scale,
    block_tables,
    cu_seqlens_q,
    seq_lens,
    topk: int,
    *,
    impl: str | None = None,
    plan: PrefillTiles | None = None,
) -> torch.Tensor:
    """Packed variable-length queries (chunked prefill included); see the module docstring.
    `plan`: the forward's precomputed Triton launch plan (the reference ignores it)."""
    _validate(q, weights, k_cache, k_scale, block_tables, seq_lens, topk)
    if cu_seqlens_q.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(f"indexer: cu_seqlens_q must be [B+1], got {tuple(cu_seqlens_q.shape)}")
    if resolve_impl(impl, q.device) == "triton":
        from kernels.indexer import triton as tri

        return tri.indexer_topk_prefill(
            q, weights, k_cache, k_scale, block_tables, cu_seqlens_q, seq_lens, topk, plan=plan
        )
    return ref.indexer_topk_prefill(
        q, weights, k_cache, k_scale, block_tables, cu_seqlens_q, seq_lens, topk
    )


def indexer_topk_decode(
    q, weights, k_cache, k_scale, block_tables, seq_lens, topk: int, *, impl: str | None = None
) -> torch.Tensor:
    """One query per sequence (row b), at position seq_lens[b] - 1."""
    _validate(q, weights, k_cache, k_scale, block_tables, seq_lens, topk)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"indexer decode: one query per sequence, got T={q.shape[0]}, B={seq_lens.shape[0]}"
        )
    if resolve_impl(impl, q.device) == "triton":
        from kernels.indexer import triton as tri

        return tri.indexer_topk_decode(q, weights, k_cache, k_scale, block_tables, seq_lens, topk)
    return ref.indexer_topk_decode(q, weights, k_cache, k_scale, block_tables, seq_lens, topk)
