"""Scatter new per-token rows into a paged cache by slot mapping (slot = page * page_size + offset;
slot -1 means "do not store", used for padding rows)."""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.kv_store import ref

__all__ = ["store_rows"]


def store_rows(
    cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor, *, impl: str | None = None
) -> None:
    """cache [P, PS, *R] <- rows [T, *R] at slot_mapping [T] (int, -1 skipped). In place."""
    if cache.dim() < 2 or tuple(cache.shape[2:]) != tuple(rows.shape[1:]):
        raise ValueError(
            f"store_rows: rows {tuple(rows.shape)} do not fit cache {tuple(cache.shape)}"
        )
    if slot_mapping.shape != (rows.shape[0],):
        raise ValueError(
            f"store_rows: slot_mapping {tuple(slot_mapping.shape)} != [T={rows.shape[0]}]"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"store_rows: slot_mapping must be int32/int64, got {slot_mapping.dtype}")
    if rows.shape[0] == 0:
        return
    if resolve_impl(impl, cache.device) == "triton":
        from kernels.kv_store import triton as tri

        return tri.store_rows(cache, rows, slot_mapping)
    return ref.store_rows(cache, rows, slot_mapping)
