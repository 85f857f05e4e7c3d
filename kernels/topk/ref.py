"""Reference row top-k: mask the invisible columns, stable sort, -1 where fewer are visible.

Ties go to the lower column, as in the indexer reference (kernels/indexer/ref.py `select`):
torch.topk's tie order depends on the row length and the device."""

from __future__ import annotations

import torch


def topk_rows(scores: torch.Tensor, lengths: torch.Tensor, topk: int) -> torch.Tensor:
    r, n = scores.shape
    out = torch.full((r, topk), -1, dtype=torch.int32, device=scores.device)
    if n == 0:
        return out
    cols = torch.arange(n, device=scores.device)
    visible = cols[None, :] < lengths[:, None]
    masked = scores.masked_fill(~visible, float("-inf"))
    idx = masked.sort(dim=-1, descending=True, stable=True).indices[:, : min(topk, n)]
    # Masked columns only win when fewer than topk are visible: turn them into padding.
    idx = torch.where(idx < lengths[:, None], idx, -1)
    out[:, : idx.shape[1]] = idx.to(torch.int32)
    return out
