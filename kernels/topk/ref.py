"""Reference row top-k: mask the invisible columns, torch.topk, -1 where fewer are visible."""

from __future__ import annotations

import torch


def topk_rows(scores: torch.Tensor, lengths: torch.Tensor, topk: int) -> torch.Tensor:
    r, n = scores.shape
    out = torch.full((r, topk), -1, dtype=torch.int32, device=scores.device)
    if n == 0:
        return out
    cols = torch.arange(n, device=scores.device)
    visible = cols[None, :] < lengths[:, None]
    idx = scores.masked_fill(~visible, float("-inf")).topk(min(topk, n), dim=-1).indices
    # Masked columns only win when fewer than topk are visible: turn them into padding.
    idx = torch.where(idx < lengths[:, None], idx, -1)
    out[:, : idx.shape[1]] = idx.to(torch.int32)
    return out
