"""FP8 operands of the lightning indexer, each in one pass (dsa.md 1.5): the Hadamard rotation
(kernels/fp8/ref.py hadamard_transform) then e4m3 with one power-of-two (ue8m0) scale per row,
act_quant's rules (amax floor 1e-4, scale = amax * fp32(1/448)).

  store_index_keys(k [T, D], k_cache [P, PS, D] e4m3, k_scale [P, PS] fp32, slot_mapping [T])
      rotated, quantised keys and their scales written at their cache slots (-1: skipped);
  quant_index_queries(q [T, HI, D], weights [T, HI] fp32) -> (q e4m3 [T, HI, D], weights *
      scale [T, HI]): the per-(token, head) query scale folded into the head weights.
D a power of two; k and q in any float dtype.
"""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.index_fp8 import ref

__all__ = ["quant_index_queries", "store_index_keys"]

FP8 = torch.float8_e4m3fn


def _check_dim(name: str, d: int) -> None:
    if d < 2 or d & (d - 1):
        raise ValueError(f"{name}: head dim must be a power of two >= 2, got {d}")


def store_index_keys(
    k: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: str | None = None,
) -> None:
    if k.dim() != 2 or not k.is_floating_point():
        raise ValueError(
            f"store_index_keys: k must be float [T, D], got {tuple(k.shape)} {k.dtype}"
        )
    t, d = k.shape
    _check_dim("store_index_keys", d)
    if k_cache.dim() != 3 or k_cache.shape[2] != d or k_cache.dtype != FP8:
        raise ValueError(
            f"store_index_keys: k_cache must be float8_e4m3fn [P, PS, D={d}], got "
            f"{tuple(k_cache.shape)} {k_cache.dtype}"
        )
    if k_scale.shape != k_cache.shape[:2] or k_scale.dtype != torch.float32:
        raise ValueError(
            f"store_index_keys: k_scale must be fp32 [P, PS] = {tuple(k_cache.shape[:2])}, got "
            f"{tuple(k_scale.shape)} {k_scale.dtype}"
        )
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"store_index_keys: slot_mapping must be int32/int64 [T={t}], got "
            f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if t == 0:
        return
    if resolve_impl(impl, k.device) == "triton":
        from kernels.index_fp8 import triton as tri

        return tri.store_index_keys(k, k_cache, k_scale, slot_mapping)
    return ref.store_index_keys(k, k_cache, k_scale, slot_mapping)


def quant_index_queries(
    q: torch.Tensor, weights: torch.Tensor, *, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(
            f"quant_index_queries: q must be float [T, HI, D], got {tuple(q.shape)} {q.dtype}"
        )
    _check_dim("quant_index_queries", q.shape[2])
    if weights.shape != q.shape[:2] or weights.dtype != torch.float32:
        raise ValueError(
            f"quant_index_queries: weights must be fp32 [T, HI] = {tuple(q.shape[:2])}, got "
            f"{tuple(weights.shape)} {weights.dtype}"
        )
    if resolve_impl(impl, q.device) == "triton":
        from kernels.index_fp8 import triton as tri

        return tri.quant_index_queries(q, weights)
    return ref.quant_index_queries(q, weights)
