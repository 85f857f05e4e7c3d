"""Reference FP8 indexer operands: the rotation, kernels/fp8's act_quant, the paged store."""

from __future__ import annotations

import torch

from kernels.fp8.ref import act_quant, hadamard_transform
from kernels.kv_store.ref import store_rows


def rotate_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], scale [...]) of the rotated rows, one ue8m0 scale each."""
    q, s = act_quant(hadamard_transform(x.float()), x.shape[-1], True)
    return q, s[..., 0]


def store_index_keys(k, k_cache, k_scale, slot_mapping) -> None:
    q, s = rotate_quant(k)
    store_rows(k_cache, q, slot_mapping)
    store_rows(k_scale, s, slot_mapping)


def quant_index_queries(q, weights):
    qq, s = rotate_quant(q)
    return qq, weights * s
