"""FP8 e4m3 activation quantisation with one scale per block of the last dimension (DSA indexer:
one scale per token for keys, per (token, head) for queries; dsa.md section 1.5)."""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.fp8 import ref
from kernels.fp8.ref import FP8_MAX, hadamard

__all__ = ["act_quant", "hadamard", "FP8_MAX"]


def act_quant(
    x: torch.Tensor, block: int | None = None, ue8m0: bool = True, *, impl: str | None = None
):
    """x [..., D] -> (x_fp8 [..., D] float8_e4m3fn, scale [..., D // block] fp32).

    `block` defaults to min(128, D); `ue8m0` rounds scales up to powers of two (DeepSeek-V3.2).
    Dequantised value: x_fp8.float() * scale (repeated over each block).
    """
    d = x.shape[-1]
    block = block or min(128, d)
    if d % block:
        raise ValueError(f"act_quant: last dim {d} is not a multiple of block {block}")
    if not x.is_floating_point():
        raise ValueError(f"act_quant: x must be floating point, got {x.dtype}")
    if resolve_impl(impl, x.device) == "triton":
        from kernels.fp8 import triton as tri

        return tri.act_quant(x, block, ue8m0)
    return ref.act_quant(x, block, ue8m0)
