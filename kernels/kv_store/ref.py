"""Reference paged-cache store."""

from __future__ import annotations

import torch


def store_rows(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    flat = cache.view(-1, *cache.shape[2:])  # [P*PS, *R]: slot indexes the flattened pages
    keep = slot_mapping >= 0
    flat[slot_mapping[keep].long()] = rows[keep].to(cache.dtype)
