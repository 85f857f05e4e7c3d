"""Causal top-k over rows of fp32 scores: the selection step of the lightning indexer.

  scores   [R, N] fp32, row r visible in columns 0 .. lengths[r] - 1 (the rest: any value)
  lengths  [R] int32, 0 <= lengths[r] <= N
Output int32 [R, topk]: the columns of the min(topk, lengths[r]) largest visible scores of row r,
in any order, then -1 padding. Among exactly equal scores the lower column wins (-0.0 == +0.0), so
every implementation selects exactly the reference's set.
"""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.topk import ref

__all__ = ["topk_rows"]


def topk_rows(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    topk: int,
    *,
    impl: str | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """`splits` (Triton only): programs per row; None chooses from the shape."""
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(
            f"topk_rows: scores must be fp32 [R, N], got {tuple(scores.shape)} {scores.dtype}"
        )
    if lengths.shape != (scores.shape[0],) or lengths.dtype != torch.int32:
        raise ValueError(
            f"topk_rows: lengths must be int32 [R={scores.shape[0]}], got "
            f"{tuple(lengths.shape)} {lengths.dtype}"
        )
    if topk < 1:
        raise ValueError(f"topk_rows: topk must be >= 1, got {topk}")
    if resolve_impl(impl, scores.device) == "triton":
        from kernels.topk import triton as tri

        return tri.topk_rows(scores, lengths, topk, splits=splits)
    return ref.topk_rows(scores, lengths, topk)
