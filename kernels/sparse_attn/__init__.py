"""Attention restricted to the indexer's selected keys, over a paged KV cache.

One family for both DSA attention shapes:
  * MLA in absorbed (MQA) form: one shared 576-d key (512 latent + 64 rope) per token, the value is
    the 512-d latent itself (pass v_cache = k_cache[..., :512]), H query heads per KV head;
  * grouped-query attention: Hkv KV heads, H = G * Hkv query heads; head h reads KV head h // G.
All query heads of a token share its selected key set.

Shapes:
  q            [T, H, Dk]            bf16 / fp16 / fp32
  k_cache      [P, PS, Hkv, Dk]
  v_cache      [P, PS, Hkv, Dv]      may be a strided view of k_cache
  block_tables [B, max_pages] int32; cu_seqlens_q [B+1] int32; seq_lens [B] int32 (as the indexer)
  indices      [T, topk] int32 logical key positions of the query's own sequence, -1 = unused
  scale        softmax scale (passed explicitly: MLA uses the original qk head dim, not 576)
Output [T, H, Dv] in q's dtype; softmax accumulated in fp32. A row with no valid index gives 0.
"""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.sparse_attn import ref

__all__ = ["sparse_attn_prefill", "sparse_attn_decode"]


def _validate(q, k_cache, v_cache, block_tables, seq_lens, indices):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"sparse_attn: q [T, H, Dk], caches [P, PS, Hkv, D]; got q "
            f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    t, h, dk = q.shape
    if k_cache.shape[3] != dk or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"sparse_attn: cache shapes {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
            f" do not fit q {tuple(q.shape)}"
        )
    if h % k_cache.shape[2]:
        raise ValueError(f"sparse_attn: H={h} is not a multiple of Hkv={k_cache.shape[2]}")
    if indices.dim() != 2 or indices.shape[0] != t or indices.dtype != torch.int32:
        raise ValueError(
            f"sparse_attn: indices must be int32 [T={t}, topk], got "
            f"{tuple(indices.shape)} {indices.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("sparse_attn: block_tables [B, max_pages] and seq_lens [B] disagree")


def sparse_attn_prefill(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    seq_lens,
    indices,
    scale: float,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Packed variable-length queries; see the module docstring."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, indices)
    if cu_seqlens_q.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(
            f"sparse_attn: cu_seqlens_q must be [B+1], got {tuple(cu_seqlens_q.shape)}"
        )
    if resolve_impl(impl, q.device) == "triton":
        from kernels.sparse_attn import triton as tri

        return tri.sparse_attn_prefill(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, indices, scale
        )
    return ref.sparse_attn_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, indices, scale
    )


def sparse_attn_decode(
    q, k_cache, v_cache, block_tables, seq_lens, indices, scale: float, *, impl: str | None = None
) -> torch.Tensor:
    """One query per sequence (row b)."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, indices)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"sparse_attn decode: one query per sequence, got T={q.shape[0]}, B={seq_lens.shape[0]}"
        )
    if resolve_impl(impl, q.device) == "triton":
        from kernels.sparse_attn import triton as tri

        return tri.sparse_attn_decode(q, k_cache, v_cache, block_tables, seq_lens, indices, scale)
    return ref.sparse_attn_decode(q, k_cache, v_cache, block_tables, seq_lens, indices, scale)
