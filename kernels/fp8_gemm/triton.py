"""Block-scaled FP8 GEMM in Triton (spec: kernels/fp8_gemm/ref.py), DeepSeek's recipe: each
128-deep slice of K is one e4m3 tensor-core dot, promoted to fp32 and multiplied by its two
scales (the token's activation scale, the weight block's scale) before it joins the fp32
accumulator, so Hopper's reduced-precision FP8 accumulation never spans more than 128 products.

grid: (cdiv(M, BM) * cdiv(N, BN),); each program: one BM x BN tile of C over all of K, GROUP_M
row tiles sweeping the columns together (L2 reuse of A). BK divides 128, so a K tile never
straddles a scale block; a BN wider than 128 loads one weight scale per column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv
from kernels.fp8_gemm.ref import BLOCK

# First guesses from the usual Hopper FP8 tiles (not yet tuned on an H200; `python -m
# kernels.bench_fp8_gemm --sweep` times SWEEP and reports the best per shape).
DECODE = {"BM": 16, "BN": 64, "BK": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
SMALL = {"BM": 64, "BN": 64, "BK": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 4}
MID = {"BM": 64, "BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
LARGE = {"BM": 128, "BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
# Interpreter (CPU tests): small tiles, BK below the block so one scale spans two K tiles.
INTERPRET = {"BM": 16, "BN": 32, "BK": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}
SWEEP = [
    DECODE,
    SMALL,
    MID,
    LARGE,
    {**LARGE, "BN": 256, "num_stages": 3},
    {**LARGE, "num_stages": 3},
    {**LARGE, "BM": 256, "BN": 128, "num_stages": 3},
    {**MID, "BN": 256, "num_warps": 8, "num_stages": 3},
    {**DECODE, "BN": 128, "num_stages": 5},
    {**DECODE, "BM": 32, "BN": 32},
]


def pick_config(m: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return INTERPRET
    if m <= 16:
        return DECODE
    if m <= 64:
        return SMALL
    return MID if m <= 512 else LARGE


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    SCALE_BLOCK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    # -- grouped tile order --
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]  # [BN, BK]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // SCALE_BLOCK).to(tl.int64) * stride_bsn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, K // BK):
        # -- one BK slice: e4m3 dot, then both scales of its 128-block --
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[:, None], other=0.0)
        kb = (kk * BK) // SCALE_BLOCK
        a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        a_ptrs += BK
        b_ptrs += BK
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(a, a_scale, b, b_scale, out_dtype, config: dict | None = None) -> torch.Tensor:
    """Inputs already validated by kernels.fp8_gemm.fp8_gemm; config: one of the tables above."""
    for name, t in (("a", a), ("b", b), ("a_scale", a_scale), ("b_scale", b_scale)):
        if t.stride(-1) != 1:
            raise ValueError(f"fp8_gemm (triton): {name} needs a contiguous last dimension")
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    cfg = config or pick_config(m, a.device)
    if BLOCK % cfg["BK"]:
        raise ValueError(f"fp8_gemm (triton): BK={cfg['BK']} must divide {BLOCK}")
    grid = (cdiv(m, cfg["BM"]) * cdiv(n, cfg["BN"]),)
    _fp8_gemm_kernel[grid](
        a,
        a_scale,
        b,
        b_scale,
        c,
        m,
        n,
        k,
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b_scale.stride(0),
        c.stride(0),
        SCALE_BLOCK=BLOCK,
        BM=cfg["BM"],
        BN=cfg["BN"],
        BK=cfg["BK"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return c
