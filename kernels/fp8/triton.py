"""FP8 e4m3 block quantisation in Triton, bit-exact with kernels/fp8/ref.py: one pass instead of
the reference's chain of fp32 temporaries (amax, divide, clamp, cast)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2
from kernels.fp8.ref import FP8_MAX

ROWS = 16


@triton.jit
def quantize(x, UE8M0: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr):
    """Rows of fp32 x [R, B] -> (e4m3-range fp32 values [R, B], scale [R]), exactly as
    kernels/fp8/ref.py act_quant; the caller casts the values to float8_e4m3fn."""
    amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-4)
    scale = amax * INV_FMAX  # as the reference: the fp32 reciprocal, one rounding
    if UE8M0:
        # 2^ceil(log2(scale)) from the bits: exact, unlike an approximate log2.
        bits = scale.to(tl.int32, bitcast=True)
        up = (bits & 0x7FFFFF) != 0
        bits = ((bits >> 23) + up.to(tl.int32)) << 23
        scale = bits.to(tl.float32, bitcast=True)
    y = tl.math.div_rn(x, scale[:, None])
    return tl.minimum(tl.maximum(y, -FMAX), FMAX), scale


# grid: (cdiv(M, ROWS), D // block); each program: ROWS rows x one quantisation block.
@triton.jit(do_not_specialize=["m"])
def _act_quant_kernel(
    x_ptr,
    y_ptr,
    s_ptr,
    m,
    stride_x,
    stride_y,
    stride_s,
    BLOCK: tl.constexpr,
    BP: tl.constexpr,
    ROWS: tl.constexpr,
    UE8M0: tl.constexpr,
    FMAX: tl.constexpr,
    INV_FMAX: tl.constexpr,
):
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blk = tl.program_id(1)
    offs_c = tl.arange(0, BP)
    rmask = offs_r < m
    mask = rmask[:, None] & (offs_c[None, :] < BLOCK)
    cols = blk * BLOCK + offs_c
    x = tl.load(
        x_ptr + offs_r.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    y, scale = quantize(x, UE8M0, FMAX, INV_FMAX)
    tl.store(
        y_ptr + offs_r.to(tl.int64)[:, None] * stride_y + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(s_ptr + offs_r.to(tl.int64) * stride_s + blk, scale, mask=rmask)


def act_quant(x: torch.Tensor, block: int, ue8m0: bool):
    shape = x.shape
    d = shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, d), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, d // block), dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(cdiv(m, ROWS), d // block)](
            x2,
            y,
            s,
            m,
            x2.stride(0),
            y.stride(0),
            s.stride(0),
            BLOCK=block,
            BP=next_pow2(block),
            ROWS=ROWS,
            UE8M0=ue8m0,
            FMAX=FP8_MAX,
            INV_FMAX=1.0 / FP8_MAX,
            num_warps=4,
        )
    return y.view(shape), s.view(*shape[:-1], d // block)
