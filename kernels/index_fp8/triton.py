"""FP8 indexer operands in Triton, bit-exact with kernels/index_fp8/ref.py: load a block of rows,
rotate them in registers by the same butterflies as kernels/fp8/ref.py hadamard_transform (log2 D
stages of exact fp32 add/sub, one multiply), quantise as act_quant, and write the e4m3 rows either
to their paged-cache slots with their scales (keys) or densely with the scales folded into the
head weights (queries). Replaces the reference's chain: an fp32 copy, a rotation matmul, an fp32
result, a quantise pass and two stores."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv
from kernels.fp8.ref import FP8_MAX
from kernels.fp8.triton import quantize

ROWS = 32
INTERPRET_ROWS = 8


@triton.jit
def _butterfly(x, R: tl.constexpr, D: tl.constexpr, H: tl.constexpr):
    """One stage: (a, b) at distance H within blocks of 2H -> (a + b, a - b)."""
    x = tl.permute(tl.reshape(x, [R, D // (2 * H), 2, H]), (0, 1, 3, 2))
    a, b = tl.split(x)
    x = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(x, [R, D])


# grid: (cdiv(M, ROWS),); each program: ROWS rows of D values.
@triton.jit(do_not_specialize=["m"])
def _rotate_quant_kernel(
    x_ptr,
    y_ptr,
    s_ptr,
    w_ptr,
    wo_ptr,
    slot_ptr,
    m,
    stride_x,
    stride_yp,
    stride_ys,
    stride_sp,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    LOG2D: tl.constexpr,
    PS: tl.constexpr,
    INV_SQRT: tl.constexpr,
    FMAX: tl.constexpr,
    INV_FMAX: tl.constexpr,
    STORE: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, D)
    rmask = rows < m
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None], other=0.0)
    x = x.to(tl.float32)
    for i in tl.static_range(LOG2D):
        x = _butterfly(x, ROWS, D, 1 << i)
    y, scale = quantize(x * INV_SQRT, True, FMAX, INV_FMAX)
    y = y.to(y_ptr.dtype.element_ty)
    if STORE:
        # -- keys: to their cache slots (slot -1: padding, not stored) --
        slot = tl.load(slot_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        ok = rmask & (slot >= 0)
        page, off = slot // PS, slot % PS
        dst = y_ptr + (page * stride_yp + off * stride_ys)[:, None] + cols[None, :]
        tl.store(dst, y, mask=ok[:, None])
        tl.store(s_ptr + page * stride_sp + off, scale, mask=ok)
    else:
        # -- queries: dense rows, the scale folded into the head weight --
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y, mask=rmask[:, None])
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
        tl.store(wo_ptr + rows, w * scale, mask=rmask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x2, y, scale, w, wo, slots, stride_yp, stride_ys, stride_sp, ps, store):
    m, d = x2.shape
    rows = ROWS if x2.device.type == "cuda" else INTERPRET_ROWS
    _rotate_quant_kernel[(cdiv(m, rows),)](
        x2,
        y,
        scale,
        w,
        wo,
        slots,
        m,
        x2.stride(0),
        stride_yp,
        stride_ys,
        stride_sp,
        ROWS=rows,
        D=d,
        LOG2D=d.bit_length() - 1,
        PS=ps,
        INV_SQRT=d**-0.5,
        FMAX=FP8_MAX,
        INV_FMAX=1.0 / FP8_MAX,
        STORE=store,
        num_warps=4,
    )


def store_index_keys(k, k_cache, k_scale, slot_mapping) -> None:
    if k_cache.stride(2) != 1 or k_scale.stride(1) != 1:
        raise ValueError("store_index_keys (triton): cache rows must be contiguous")
    x2 = _rows(k)
    _launch(
        x2,
        k_cache,
        k_scale,
        k_scale,  # unused weight pointers
        k_scale,
        slot_mapping,
        k_cache.stride(0),
        k_cache.stride(1),
        k_scale.stride(0),
        k_cache.shape[1],
        True,
    )


def quant_index_queries(q, weights):
    t, h, d = q.shape
    x2 = _rows(q)
    y = torch.empty((t, h, d), dtype=torch.float8_e4m3fn, device=q.device)
    w = weights.contiguous()
    wo = torch.empty_like(w)
    if t:
        _launch(x2, y, wo, w, wo, wo, 0, 0, 0, 1, False)
    return y, wo
