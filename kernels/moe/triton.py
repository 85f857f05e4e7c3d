"""Fused MoE in Triton (spec: kernels/moe/__init__.py): no host sync, CUDA-graph capturable.

Four launches, all sized from T, k, E and the weight shapes only:
  1. align (one program): the T*k (token, slot) pairs are grouped by expert, each expert's
     segment padded to a multiple of BM rows; writes the pair index of every padded row (T*k for
     a padding row), the expert of every BM-row block and the padded row count, all on the
     device. Ranks inside a segment come from integer atomics, so the order of rows within an
     expert may change from run to run; each output row depends on its own inputs only, so the
     result does not.
  2. gate_up GEMM over the blocks: rows gathered from x by token, two accumulators (the gate
     and the up rows of the expert's weight), SiLU(gate) * up in the epilogue, stored to the
     padded intermediate h [rows, I] in x's dtype.
  3. down GEMM over the same blocks: h @ W_down[e]^T times the routing weight, each row stored
     to its pair's row of y [T*k, d].
  4. combine: out[t] = sum_j y[t*k + j] (fp32 sum, no atomics).
The grids of 2 and 3 cover the worst case, cdiv(T*k + min(E, T*k) * (BM - 1), BM) blocks; blocks
past the real padded count exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2

# BM: rows per block (the align step pads each expert to a multiple of it). up: the gate_up
# GEMM, BN intermediate columns per program, each with a gate and an up accumulator; down: the
# down GEMM, BN hidden columns per program. GROUP_M blocks share a column sweep (L2 reuse of x).
DECODE = {
    "BM": 16,
    "up": {"BN": 64, "BK": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
    "down": {"BN": 64, "BK": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
}
MID = {
    "BM": 64,
    "up": {"BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    "down": {"BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
}
PREFILL = {
    "BM": 128,
    "up": {"BN": 64, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    "down": {"BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
}
# Interpreter (CPU tests): small tiles, and BK below the test shapes' d so the K masks run.
INTERPRET = {
    "BM": 16,
    "up": {"BN": 16, "BK": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "down": {"BN": 32, "BK": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
}
# The tables above are first guesses (from the usual Hopper GEMM tiles), not yet tuned on an
# H200: `python -m kernels.bench_moe --sweep` times these candidates per regime (index 0 is the
# default) so the defaults can be set from measurements.
SWEEP = {
    "decode": [
        DECODE,
        {**DECODE, "up": {**DECODE["up"], "BN": 32}, "down": {**DECODE["down"], "BN": 32}},
        {**DECODE, "up": {**DECODE["up"], "BK": 64, "num_stages": 5}},
        {**DECODE, "BM": 32, "up": {**DECODE["up"], "num_warps": 8}},
    ],
    "mid": [
        MID,
        {**MID, "up": {**MID["up"], "BN": 128, "num_warps": 8, "num_stages": 3}},
        {**MID, "BM": 32, "up": {**MID["up"], "BK": 128, "num_stages": 3}},
        {**MID, "BM": 128, "up": PREFILL["up"], "down": PREFILL["down"]},
    ],
    "prefill": [
        PREFILL,
        {**PREFILL, "up": {**PREFILL["up"], "BN": 128}},
        {
            **PREFILL,
            "up": {**PREFILL["up"], "num_stages": 4},
            "down": {**PREFILL["down"], "BK": 32, "num_stages": 4},
        },
        {**PREFILL, "BM": 64, "up": {**PREFILL["up"], "BN": 128}, "down": MID["down"]},
    ],
}
MID_MAX_ROWS_PER_EXPERT = 192  # mean pairs per expert from which 128-row blocks are used
_ALIGN_CHUNK_SMALL, _ALIGN_CHUNK = 256, 2048


def regime(t: int, topk: int, n_experts: int) -> str:
    if t <= 64:
        return "decode"
    return "mid" if t * topk < MID_MAX_ROWS_PER_EXPERT * n_experts else "prefill"


def pick_config(t: int, topk: int, n_experts: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return INTERPRET
    return {"decode": DECODE, "mid": MID, "prefill": PREFILL}[regime(t, topk, n_experts)]


def fit(cfg: dict, d: int, inter: int, elt: int) -> dict:
    """Tiles no wider than the problem (16 at least, for tl.dot), and half-depth K tiles for
    4-byte inputs, whose pipelined stages would otherwise overflow shared memory."""

    def one(g: dict, n: int, k: int) -> dict:
        bk = min(g["BK"], max(16, next_pow2(k)))
        bk = max(16, bk // 2) if elt == 4 else bk
        return {**g, "BN": min(g["BN"], max(16, next_pow2(n))), "BK": bk}

    return {**cfg, "up": one(cfg["up"], inter, d), "down": one(cfg["down"], d, inter)}


def max_blocks(n_pairs: int, n_experts: int, bm: int) -> int:
    """Worst-case BM-row blocks after padding: at most min(E, pairs) experts get a partial block."""
    return cdiv(n_pairs + min(n_experts, n_pairs) * (bm - 1), bm)


# -- 1. align: one program, three phases separated by CTA barriers ------------------------------
@triton.jit(do_not_specialize=["n_pairs", "n_blocks"])
def _align_kernel(
    ids_ptr,
    counts_ptr,
    start_ptr,
    rank_ptr,
    total_ptr,
    expert_ptr,
    sorted_ptr,
    n_pairs,
    n_blocks,
    E: tl.constexpr,
    E_P2: tl.constexpr,
    BM: tl.constexpr,
    CHUNK: tl.constexpr,
    BB: tl.constexpr,
):
    offs_e = tl.arange(0, E_P2)
    e_ok = offs_e < E
    tl.store(counts_ptr + offs_e, tl.zeros([E_P2], tl.int32), mask=e_ok)
    for r0 in range(0, n_blocks * BM, CHUNK):  # every row a padding row until phase 3
        r = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + r, tl.full([CHUNK], 0, tl.int32) + n_pairs, mask=r < n_blocks * BM)
    tl.debug_barrier()
    # Phase 1: the atomic's old value is the pair's rank inside its expert's segment.
    for p0 in range(0, n_pairs, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + p, mask=p < n_pairs, other=-1)
        ok = (e >= 0) & (e < E)  # out-of-range ids get no row (see the op's docstring)
        e = e.to(tl.int32)
        rank = tl.atomic_add(counts_ptr + e, 1, mask=ok)
        tl.store(rank_ptr + p, rank, mask=ok)
    tl.debug_barrier()
    # Phase 2: padded segment offsets, the total, the expert of each block. Volatile loads: the
    # counters were updated by atomics in L2, so no stale L1 line may answer.
    cnt = tl.load(counts_ptr + offs_e, mask=e_ok, other=0, volatile=True)
    padded = (cnt + BM - 1) // BM * BM
    end = tl.cumsum(padded, 0)
    tl.store(start_ptr + offs_e, end - padded, mask=e_ok)
    tl.store(total_ptr, tl.sum(padded, 0))
    for b0 in range(0, n_blocks, BB):
        b = b0 + tl.arange(0, BB)
        # experts whose segment ends at or before the block's first row precede it
        before = tl.sum((end[None, :] <= (b * BM)[:, None]).to(tl.int32), 1)
        tl.store(expert_ptr + b, tl.minimum(before, E - 1), mask=b < n_blocks)
    tl.debug_barrier()
    # Phase 3: scatter each pair to its row.
    for p0 in range(0, n_pairs, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + p, mask=p < n_pairs, other=-1)
        ok = (e >= 0) & (e < E)
        e = e.to(tl.int32)
        rank = tl.load(rank_ptr + p, mask=ok, other=0, volatile=True)
        start = tl.load(start_ptr + e, mask=ok, other=0, volatile=True)
        tl.store(sorted_ptr + start + rank, p, mask=ok)


def moe_align(topk_ids: torch.Tensor, n_experts: int, bm: int):
    """(sorted_ids [blocks * bm] int32, block_expert [blocks] int32, total [1] int32): the pair
    index of each padded row (T*k on padding rows), the expert of each block, the padded rows."""
    ids = topk_ids.contiguous().view(-1)
    n = ids.numel()
    blocks = max_blocks(n, n_experts, bm)

    def a32(v: int) -> int:  # 128-byte aligned slices, so pointer specialisation never varies
        return cdiv(v, 32) * 32

    sizes = [n_experts, n_experts, n, 1, blocks, blocks * bm]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + a32(s))
    meta = torch.empty(offs[-1], dtype=torch.int32, device=ids.device)
    counts, start, rank, total, expert, sorted_ids = (
        meta[o : o + s] for o, s in zip(offs, sizes, strict=False)
    )
    e_p2 = max(16, next_pow2(n_experts))
    small = n <= _ALIGN_CHUNK_SMALL
    _align_kernel[(1,)](
        ids,
        counts,
        start,
        rank,
        total,
        expert,
        sorted_ids,
        n,
        blocks,
        E=n_experts,
        E_P2=e_p2,
        BM=bm,
        CHUNK=_ALIGN_CHUNK_SMALL if small else _ALIGN_CHUNK,
        BB=max(16, 4096 // e_p2),
        num_warps=4 if small else 16,
    )
    return sorted_ids, expert, total


# -- 2./3. grouped GEMMs -----------------------------------------------------------------------
@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program -> (block, column tile): GROUP_M consecutive blocks sweep the columns together."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit(do_not_specialize=["n_pairs", "n_blocks"])
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    sorted_ptr,
    expert_ptr,
    total_ptr,
    n_pairs,
    n_blocks,
    D,
    I,
    stride_xt,
    stride_we,
    stride_wn,
    stride_ht,
    TOPK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), n_blocks, tl.cdiv(I, BN), GROUP_M)
    if pid_m * BM >= tl.load(total_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < n_pairs
    tok = (pair // TOPK).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    col_ok = offs_n < I
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn  # the up rows follow the gate rows
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, tl.cdiv(D, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < D - kk * BK
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["n_pairs", "n_blocks"])
def _down_kernel(
    h_ptr,
    w_ptr,
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
    stride_we,
    stride_wn,
    stride_yt,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), n_blocks, tl.cdiv(D, BN), GROUP_M)
    if pid_m * BM >= tl.load(total_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < n_pairs
    offs_n = pid_n * BN + tl.arange(0, BN)
    col_ok = offs_n < D
    offs_k = tl.arange(0, BK)
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_ht + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, tl.cdiv(I, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < I - kk * BK
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    acc = acc * tl.load(tw_ptr + pair, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# -- 4. combine --------------------------------------------------------------------------------
@triton.jit
def _combine_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    D,
    stride_yt,
    stride_ot,
    E: tl.constexpr,
    TOPK: tl.constexpr,
    BD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = offs < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(ids_ptr + t * TOPK + j)
        ok = (e >= 0) & (e < E)  # a dropped slot's row of y was never written
        v = tl.load(y_ptr + (t * TOPK + j) * stride_yt + offs, mask=d_ok & ok, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check(x, w_gate_up, w_down) -> None:
    for name, a in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if a.stride(-1) != 1:
            raise ValueError(f"moe (triton): {name} needs a contiguous last dimension")


def fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, config: dict | None = None):
    """Inputs already validated by kernels.moe.fused_moe; config: one of the tables above."""
    _check(x, w_gate_up, w_down)
    t, d = x.shape
    n_experts, two_i, _ = w_gate_up.shape
    inter, topk = two_i // 2, topk_ids.shape[1]
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    cfg = fit(config or pick_config(t, topk, n_experts, x.device), d, inter, x.element_size())
    bm, up, down = cfg["BM"], cfg["up"], cfg["down"]
    ids = topk_ids.contiguous()
    sorted_ids, block_expert, total = moe_align(ids, n_experts, bm)
    n_pairs, n_blocks = t * topk, block_expert.numel()
    h = torch.empty(n_blocks * bm, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(n_blocks * cdiv(inter, up["BN"]),)](
        x,
        w_gate_up,
        h,
        sorted_ids,
        block_expert,
        total,
        n_pairs,
        n_blocks,
        d,
        inter,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        h.stride(0),
        TOPK=topk,
        BM=bm,
        BN=up["BN"],
        BK=up["BK"],
        GROUP_M=up["GROUP_M"],
        EVEN_K=d % up["BK"] == 0,
        num_warps=up["num_warps"],
        num_stages=up["num_stages"],
    )
    y = torch.empty(n_pairs, d, dtype=x.dtype, device=x.device)
    _down_kernel[(n_blocks * cdiv(d, down["BN"]),)](
        h,
        w_down,
        y,
        topk_weights.contiguous(),
        sorted_ids,
        block_expert,
        total,
        n_pairs,
        n_blocks,
        d,
        inter,
        h.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        y.stride(0),
        BM=bm,
        BN=down["BN"],
        BK=down["BK"],
        GROUP_M=down["GROUP_M"],
        EVEN_K=inter % down["BK"] == 0,
        num_warps=down["num_warps"],
        num_stages=down["num_stages"],
    )
    bd = min(1024, max(16, next_pow2(d)))
    _combine_kernel[(t, cdiv(d, bd))](
        y, ids, out, d, y.stride(0), out.stride(0), E=n_experts, TOPK=topk, BD=bd, num_warps=4
    )
    return out
