"""Paged-cache store in Triton: one program copies BLOCK elements of one token's row to its slot.
Rows move as raw bits (same-size integer views), so one kernel serves bf16, fp32 and fp8 caches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import bits_view, cdiv, next_pow2

MAX_BLOCK = 1024


# grid: (T, cdiv(N, BLOCK)); slot -1 rows are skipped.
@triton.jit(do_not_specialize=["n"])
def _store_kernel(
    cache_ptr,
    rows_ptr,
    slot_ptr,
    n,
    stride_cp,
    stride_cs,
    stride_r,
    PS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        mask = offs < n
        x = tl.load(rows_ptr + t * stride_r + offs, mask=mask)
        dst = cache_ptr + (slot // PS) * stride_cp + (slot % PS) * stride_cs + offs
        tl.store(dst, x, mask=mask)


def store_rows(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    t, ps = rows.shape[0], cache.shape[1]
    n = rows[0].numel()
    # A slot's row must be one contiguous run of n elements (true for every cache we allocate).
    inner = cache[0, 0]
    if n and not inner.is_contiguous():
        raise ValueError(
            f"store_rows (triton): cache rows are not contiguous, strides {tuple(cache.stride())}"
        )
    rows = rows.to(cache.dtype).reshape(t, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    block = min(MAX_BLOCK, max(16, next_pow2(n)))
    _store_kernel[(t, cdiv(n, block))](
        bits_view(cache),
        bits_view(rows),
        slot_mapping,
        n,
        cache.stride(0),
        cache.stride(1),
        rows.stride(0),
        PS=ps,
        BLOCK=block,
        num_warps=4,
    )
