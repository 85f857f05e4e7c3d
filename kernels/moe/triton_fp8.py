"""Fused MoE with FP8 experts in Triton (spec: kernels/moe/ref.py fused_moe_fp8): e4m3 expert
weights with 128 x 128 block scales, activations quantised per token and 128-wide block, each
128-deep K slice a tensor-core dot promoted to fp32 and scaled (as kernels/fp8_gemm).

The launches of kernels/moe/triton.py, with FP8 GEMMs:
  0. x -> e4m3 + scales (kernels.fp8 act_quant, one pass);
  1. align (shared with the bf16 path);
  2. gate_up: BN = 128 intermediate columns per program, exactly one activation-scale block,
     so the epilogue computes SiLU(gate) * up, rounds it to x's dtype and quantises each row's
     128 values itself (kernels.fp8.triton.quantize, bit-exact with the reference's act_quant):
     the intermediate goes to memory once, in e4m3, with its scales;
  3. down: the e4m3 intermediate times W_down[e] (block-scaled) times the routing weight;
  4. combine (shared).
No host sync; every shape from T, k, E and the weight shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2
from kernels.fp8 import act_quant
from kernels.fp8.ref import FP8_MAX
from kernels.fp8.triton import quantize
from kernels.fp8_gemm.ref import BLOCK
from kernels.moe.triton import _combine_kernel, _tile, fit, moe_align, pick_config


@triton.jit(do_not_specialize=["n_pairs", "n_blocks"])
def _gate_up_fp8_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    h_ptr,
    hs_ptr,
    sorted_ptr,
    expert_ptr,
    total_ptr,
    n_pairs,
    n_blocks,
    D,
    I,
    stride_xt,
    stride_xst,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_ht,
    stride_hst,
    TOPK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SB: tl.constexpr,
    GROUP_M: tl.constexpr,
    X_DTYPE: tl.constexpr,
    UE8M0: tl.constexpr,
    FMAX: tl.constexpr,
    INV_FMAX: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), n_blocks, tl.cdiv(I, BN), GROUP_M)
    if pid_m * BM >= tl.load(total_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < n_pairs
    tok = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)  # I is whole 128-blocks: no column mask
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    u_ptrs = g_ptrs + I * stride_wn  # the up rows follow the gate rows
    as_ptrs = xs_ptr + tok * stride_xst
    gs_ptrs = ws_ptr + e * stride_wse + (offs_n // SB).to(tl.int64) * stride_wsn
    us_ptrs = gs_ptrs + (I // SB) * stride_wsn
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, D // BK):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        g = tl.load(g_ptrs)
        u = tl.load(u_ptrs)
        kb = (kk * BK) // SB
        a_s = tl.load(as_ptrs + kb, mask=row_ok, other=0.0)[:, None]
        acc_g += tl.dot(a, tl.trans(g)) * a_s * tl.load(gs_ptrs + kb)[None, :]
        acc_u += tl.dot(a, tl.trans(u)) * a_s * tl.load(us_ptrs + kb)[None, :]
        a_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    # -- SwiGLU, rounded to x's dtype as the reference, then this row block's e4m3 + scale --
    h = (acc_g * tl.sigmoid(acc_g) * acc_u).to(X_DTYPE).to(tl.float32)
    hq, hs = quantize(h, UE8M0, FMAX, INV_FMAX)
    rows = offs_m.to(tl.int64)
    tl.store(
        h_ptr + rows[:, None] * stride_ht + offs_n[None, :],
        hq.to(h_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(hs_ptr + rows * stride_hst + pid_n, hs, mask=row_ok)


@triton.jit(do_not_specialize=["n_pairs", "n_blocks"])
def _down_fp8_kernel(
    h_ptr,
    hs_ptr,
    w_ptr,
    ws_ptr,
    y_ptr,
    tw_ptr,
    sorted_ptr,
    expert_ptr,
    total_ptr,
    n_pairs,
    n_blocks,
    D,
    I,
    stride_ht,
    stride_hst,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_yt,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SB: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), n_blocks, tl.cdiv(D, BN), GROUP_M)
    if pid_m * BM >= tl.load(total_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < n_pairs
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    col_ok = offs_n < D
    offs_k = tl.arange(0, BK)
    a_ptrs = h_ptr + rows[:, None] * stride_ht + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    as_ptrs = hs_ptr + rows * stride_hst
    bs_ptrs = ws_ptr + e * stride_wse + (offs_n // SB).to(tl.int64) * stride_wsn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, I // BK):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[:, None], other=0.0)
        kb = (kk * BK) // SB
        a_s = tl.load(as_ptrs + kb, mask=row_ok, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=col_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        a_ptrs += BK
        b_ptrs += BK
    acc = acc * tl.load(tw_ptr + pair, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# x's dtype, to which the intermediate is rounded before its quantisation (as the reference)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def fp8_config(t: int, topk: int, n_experts: int, d: int, inter: int, device) -> dict:
    """The bf16 path's tables, fitted to 1-byte operands, with BK dividing the scale block and
    the gate_up tile exactly one block wide (its epilogue quantises whole blocks)."""
    cfg = fit(pick_config(t, topk, n_experts, device), d, inter, 1)
    up = {**cfg["up"], "BN": BLOCK, "BK": min(cfg["up"]["BK"], BLOCK)}
    down = {**cfg["down"], "BK": min(cfg["down"]["BK"], BLOCK)}
    return {**cfg, "up": up, "down": down}


def fused_moe_fp8(
    x, w_gate_up, gu_scale, w_down, d_scale, topk_weights, topk_ids, ue8m0, config=None
):
    """Inputs already validated by kernels.moe.fused_moe_fp8."""
    for name, a in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if a.stride(-1) != 1:
            raise ValueError(f"moe fp8 (triton): {name} needs a contiguous last dimension")
    t, d = x.shape
    n_experts, two_i, _ = w_gate_up.shape
    inter, topk = two_i // 2, topk_ids.shape[1]
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    cfg = config or fp8_config(t, topk, n_experts, d, inter, x.device)
    bm, up, down = cfg["BM"], cfg["up"], cfg["down"]
    if up["BN"] != BLOCK or BLOCK % up["BK"] or BLOCK % down["BK"]:
        raise ValueError(f"moe fp8 (triton): gate_up BN must be {BLOCK}, BKs must divide it")
    xq, xs = act_quant(x, BLOCK, ue8m0, impl="triton")
    ids = topk_ids.contiguous()
    sorted_ids, block_expert, total = moe_align(ids, n_experts, bm)
    n_pairs, n_blocks = t * topk, block_expert.numel()
    h = torch.empty(n_blocks * bm, inter, dtype=torch.float8_e4m3fn, device=x.device)
    hs = torch.empty(n_blocks * bm, inter // BLOCK, dtype=torch.float32, device=x.device)
    gu_scale, d_scale = gu_scale.contiguous(), d_scale.contiguous()
    _gate_up_fp8_kernel[(n_blocks * (inter // BLOCK),)](
        xq, xs, w_gate_up, gu_scale, h, hs, sorted_ids, block_expert, total,
        n_pairs, n_blocks, d, inter,
        xq.stride(0), xs.stride(0), w_gate_up.stride(0), w_gate_up.stride(1),
        gu_scale.stride(0), gu_scale.stride(1), h.stride(0), hs.stride(0),
        TOPK=topk, BM=bm, BN=BLOCK, BK=up["BK"], SB=BLOCK, GROUP_M=up["GROUP_M"],
        X_DTYPE=_TL_DTYPE[x.dtype], UE8M0=ue8m0, FMAX=FP8_MAX, INV_FMAX=1.0 / FP8_MAX,
        num_warps=up["num_warps"], num_stages=up["num_stages"],
    )  # fmt: skip
    y = torch.empty(n_pairs, d, dtype=x.dtype, device=x.device)
    _down_fp8_kernel[(n_blocks * cdiv(d, down["BN"]),)](
        h, hs, w_down, d_scale, y, topk_weights.contiguous(), sorted_ids, block_expert, total,
        n_pairs, n_blocks, d, inter,
        h.stride(0), hs.stride(0), w_down.stride(0), w_down.stride(1),
        d_scale.stride(0), d_scale.stride(1), y.stride(0),
        BM=bm, BN=down["BN"], BK=down["BK"], SB=BLOCK, GROUP_M=down["GROUP_M"],
        num_warps=down["num_warps"], num_stages=down["num_stages"],
    )  # fmt: skip
    bd = min(1024, max(16, next_pow2(d)))
    _combine_kernel[(t, cdiv(d, bd))](
        y, ids, out, d, y.stride(0), out.stride(0), E=n_experts, TOPK=topk, BD=bd, num_warps=4
    )
    return out
