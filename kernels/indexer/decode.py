"""Decode indexer in Triton: scores and a per-part top-k filter in one kernel, then the split top-k.

One query per sequence. Sequence b's keys are cut into S parts from its own length n on the
device (part s: keys [s*C, (s+1)*C), C = cdiv(n, S) rounded up to BN), so the work follows each
row's length and nothing depends on the block table's width (inside CUDA graphs the engine passes
the full max-model-length width). Grid (S, B), S from the shape only (decode_splits), every
buffer sized by (B, S, CAP): no host sync, graph-safe.

Program (s, b) scores its part BN keys at a time (the HI heads of the query form the MMA's M side:
[BH, D] x [D, BN]) and appends (key, column) of every key that can still be in the part's top-k to
its buffer of CAP entries, in runs of tiles that cannot overflow it (a loop without branches, so
Triton pipelines the key loads). When the buffer has no room for a tile it keeps only its best
topk (exact radix threshold, stable in-place compaction, ties to the lower column) and from then
on rejects keys not better than the topk-th: a rejected key has topk better ones in its own part,
so it is not in the row's top-k. With CAP >= the longest part no compaction ever runs (batch 1 at
200K keys: 256 parts of ~800 keys; batch 64: 8 parts of 25K keys, compacting a few times each).
Sequences with at most topk keys select all of them and are not scored.

The parts are then merged by the split radix select (kernels/topk/split.py topk_parts), which
writes each row's columns in ascending order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2, num_sms
from kernels.topk import split
from kernels.topk.keys import KEY_MAX, score_key
from kernels.topk.triton import threshold

DECODE_CONFIGS = [
    {"BN": 128, "num_warps": 4, "num_stages": 2},
    {"BN": 256, "num_warps": 8, "num_stages": 2},
    {"BN": 64, "num_warps": 4, "num_stages": 2},
]
DEFAULT_DECODE = DECODE_CONFIGS[0]
INTERPRET_DECODE = {"BN": 32, "num_warps": 4, "num_stages": 1}
CAP_TOPK = 2  # buffer entries per part, in topk: the most a long part keeps before compacting
# Parts per sequence: about OVERSUB programs per SM (loads in flight hide the gather latency), at
# least MIN_PART keys each, at most MAX_PARTS (the merge gathers one count per part).
OVERSUB = 4
MIN_PART = 512
MAX_PARTS = 256
CBLOCK = 1024  # compaction block (keys)
INTERPRET_CBLOCK = 64


@triton.jit
def _compact(pk_ptr, pc_ptr, m, thr, k1, BLOCK: tl.constexpr):
    """Keep, in order, the entries below `thr` and the first k1 equal to it (in place: an entry
    only moves down, past entries already read)."""
    ar = tl.arange(0, BLOCK)
    n_out = m * 0
    ties = m * 0
    for start in range(0, m, BLOCK):
        offs = start + ar
        msk = offs < m
        key = tl.load(pk_ptr + offs, mask=msk, other=0)
        col = tl.load(pc_ptr + offs, mask=msk, other=0)
        eq = (msk & (key == thr)).to(tl.int32)
        take = (msk & (key < thr)) | ((eq != 0) & (ties + tl.cumsum(eq, 0) <= k1))
        t32 = take.to(tl.int32)
        dst = n_out + tl.cumsum(t32, 0) - 1
        tl.debug_barrier()  # every thread has read this block before any entry moves
        tl.store(pk_ptr + dst, key, mask=take)
        tl.store(pc_ptr + dst, col, mask=take)
        n_out += tl.sum(t32, 0)
        ties += tl.sum(eq, 0)
    return n_out


# grid: (S, B); program (s, b): part s of sequence b's keys against its query's heads.
@triton.jit(do_not_specialize=["topk", "S", "cap"])
def _decode_parts_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    ks_ptr,
    bt_ptr,
    len_ptr,
    pk_ptr,
    pc_ptr,
    cnt_ptr,
    stride_qt,
    stride_qh,
    stride_wt,
    stride_kp,
    stride_ks,
    stride_sp,
    stride_bt,
    topk,
    S,
    cap,
    H: tl.constexpr,
    BH: tl.constexpr,
    D: tl.constexpr,
    PS: tl.constexpr,
    BN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(len_ptr + b)
    if n > topk:
        c = tl.cdiv(tl.cdiv(n, S), BN) * BN
        lo = tl.minimum(s * c, n)
        hi = tl.minimum(lo + c, n)
        part = b * S + s
        pk_ptr = pk_ptr + part * cap
        pc_ptr = pc_ptr + part * cap
        offs_d = tl.arange(0, D)
        offs_h = tl.arange(0, BH)
        hmask = offs_h < H
        q = tl.load(
            q_ptr + b * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
            mask=hmask[:, None],
            other=0.0,
        )
        w = tl.load(w_ptr + b * stride_wt + offs_h, mask=hmask, other=0.0)
        m = n * 0  # entries in the buffer
        thr = KEY_MAX + m  # after the first compaction: the part's topk-th best key
        full = m  # 1 once a compaction has run (thr is a real key)
        start = lo
        while start < hi:
            if cap - m < BN:
                # -- keep the part's best topk so far; later keys must beat the topk-th --
                tl.debug_barrier()  # the buffer was written by other threads
                thr, k1 = threshold(pk_ptr, pk_ptr, pc_ptr, m, topk, False, CBLOCK)
                m = _compact(pk_ptr, pc_ptr, m, thr, k1, CBLOCK)
                full = m * 0 + 1
                tl.debug_barrier()
            # -- a run of tiles that cannot overflow the buffer (no branch: software-pipelined) --
            end = tl.minimum(hi, start + (cap - m) // BN * BN)
            for t0 in range(start, end, BN):
                offs_n = t0 + tl.arange(0, BN)
                kmask = offs_n < hi
                page = tl.load(bt_ptr + b * stride_bt + offs_n // PS, mask=kmask, other=0)
                page = page.to(tl.int64)
                k_off = page * stride_kp + (offs_n % PS) * stride_ks
                k = tl.load(
                    k_ptr + k_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0
                )
                sc = tl.sum(tl.maximum(tl.dot(q, tl.trans(k)), 0.0) * w[:, None], 0)  # [BN]
                if HAS_SCALE:
                    ks = tl.load(ks_ptr + page * stride_sp + offs_n % PS, mask=kmask, other=0.0)
                    sc = sc * ks
                key = score_key(sc)
                keep = kmask & ((key < thr) | (full == 0))
                k32 = keep.to(tl.int32)
                slot = m + tl.cumsum(k32, 0) - 1
                tl.store(pk_ptr + slot, key, mask=keep)
                tl.store(pc_ptr + slot, offs_n, mask=keep)
                m += tl.sum(k32, 0)
            start = end
        tl.store(cnt_ptr + part, m)


def check(q, k_cache, k_scale) -> None:
    di = q.shape[2]
    if di < 16 or di & (di - 1):
        raise ValueError(f"indexer (triton): DI must be a power of two >= 16, got {di}")
    if q.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("indexer (triton): q and k_cache need a contiguous last dimension")
    if k_scale is not None and k_scale.stride(1) != 1:
        raise ValueError("indexer (triton): k_scale needs a contiguous last dimension")


def decode_splits(b: int, width: int, device: torch.device) -> int:
    """Parts per sequence from the shape alone (graph-safe)."""
    return max(1, min(MAX_PARTS, OVERSUB * num_sms(device) // max(b, 1), cdiv(width, MIN_PART)))


def part_cap(topk: int, width: int, splits: int, bn: int) -> int:
    """Entries per part: the longest possible part (no compaction), capped at CAP_TOPK * topk,
    and room for topk kept entries plus one tile."""
    longest = cdiv(cdiv(width, splits), bn) * bn
    return max(topk + bn, min(longest, CAP_TOPK * topk))


def indexer_topk_decode(
    q,
    weights,
    k_cache,
    k_scale,
    block_tables,
    seq_lens,
    topk: int,
    config: dict | None = None,
    topk_config: dict | None = None,
    select: str = "radix",
    splits: int | None = None,
    cap: int | None = None,
) -> torch.Tensor:
    """`select`: "radix" (the full op) or "none" (scores and part filters only, for
    kernels.bench; the output is left unwritten). `splits`/`cap`: parts per sequence and entries
    per part (None: from the shape)."""
    check(q, k_cache, k_scale)
    cuda = q.device.type == "cuda"
    cfg = config or (DEFAULT_DECODE if cuda else INTERPRET_DECODE)
    bn = cfg["BN"]
    b, hi, di = q.shape
    out = torch.empty((b, topk), dtype=torch.int32, device=q.device)
    if b == 0:
        return out
    width = block_tables.shape[1] * k_cache.shape[1]
    splits = splits or decode_splits(b, width, q.device)
    cap = cap or part_cap(topk, width, splits, bn)
    if cap < topk + bn:
        raise ValueError(f"indexer decode: part cap {cap} < topk + BN = {topk + bn}")
    keys = torch.empty((b * splits, cap), dtype=torch.int32, device=q.device)
    cols = torch.empty((b * splits, cap), dtype=torch.int32, device=q.device)
    counts = torch.empty(b * splits, dtype=torch.int32, device=q.device)
    lengths = seq_lens.to(torch.int32)
    ks = k_scale if k_scale is not None else k_cache  # unused pointer when HAS_SCALE is False
    weights = weights.contiguous()
    _decode_parts_kernel[(splits, b)](
        q,
        weights,
        k_cache,
        ks,
        block_tables,
        lengths,
        keys,
        cols,
        counts,
        q.stride(0),
        q.stride(1),
        weights.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_scale.stride(0) if k_scale is not None else 0,
        block_tables.stride(0),
        topk,
        splits,
        cap,
        H=hi,
        BH=max(16, next_pow2(hi)),
        D=di,
        PS=k_cache.shape[1],
        BN=bn,
        HAS_SCALE=k_scale is not None,
        CBLOCK=CBLOCK if cuda else INTERPRET_CBLOCK,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if select == "none":
        return out
    return split.topk_parts(keys, cols, counts, lengths, out, topk, splits, config=topk_config)
