"""Row top-k spread over S programs per row: exact radix select, one launch per 8-bit digit.

For few rows (decode: batch 1 to ~64) one program per row leaves the GPU idle while one SM walks
200K keys. Here row r is cut into S parts and program (s, r) owns part s:
  - a scores row: columns [s*C, (s+1)*C) with C = cdiv(n, S) rounded up to GRAIN, from the
    row's own length n on the device (so short rows cost little whatever the width);
  - or parts made by another kernel (kernels/indexer/decode.py): entries [0, count) of a (key,
    column) buffer per part, columns ascending within a part and from part to part.
Keys: kernels/topk/keys.py. Launches (grid (S, R) each, no host sync, sizes from shapes only):
  level 1..4: each program histograms one digit of its part's keys that match the digits found
      so far, adds it into the row's histogram of that digit (integer atomics: the sums do not
      depend on the order) and keeps its own cumulative histogram; from level 2 on it first
      reads the row's previous histogram (256 bins) to find that digit, as every program of the
      row does, with no inter-program sync;
  write: the last digit gives the exact threshold key and how many of its ties to take; each
      program's output offset is the number of selected keys in earlier parts (from their
      cumulative histograms), so every program writes its own selected columns, in column
      order, with ties going to the lowest columns: exactly the reference's set.
No sample and no miss path: every row costs five passes over its keys (L2-resident after the
first), which for few rows beats one program's single pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2, num_sms
from kernels.topk.keys import SIGN, digit, in_prefix, pick_digit, score_key

MAX_SPLITS = 128  # the write kernel gathers S cumulative counts per program
OVERSUB = 2  # programs per SM aimed at
MIN_PART = 1024  # fewer keys per program is all launch overhead
MIN_WIDTH = 8192  # narrower rows stay on the one-program path
GRAIN = 64  # part boundaries on whole 256-byte runs of scores
SPLIT_CONFIGS = [
    {"BLOCK": 1024, "num_warps": 4},
    {"BLOCK": 2048, "num_warps": 8},
    {"BLOCK": 512, "num_warps": 4},
]
DEFAULT_SPLIT = SPLIT_CONFIGS[0]
INTERPRET_SPLIT = {"BLOCK": 64, "num_warps": 4}


def splits_for(rows: int, width: int, device: torch.device) -> int:
    """Programs per row from the shape alone (graph-safe): about OVERSUB waves of one program
    per SM, at least MIN_PART columns each; 1 (the one-program path) for many or narrow rows."""
    if width < MIN_WIDTH:
        return 1
    s = min(MAX_SPLITS, OVERSUB * num_sms(device) // max(rows, 1), cdiv(width, MIN_PART))
    return s if s >= 2 else 1


@triton.jit
def _part(len_ptr, cnt_ptr, r, s, S, FROM_PARTS: tl.constexpr, GRAIN: tl.constexpr):
    """Row length n and the part's [lo, hi): columns of the row, or entries of the part."""
    n = tl.load(len_ptr + r)
    if FROM_PARTS:
        lo = n * 0
        hi = tl.load(cnt_ptr + r * S + s)
    else:
        c = tl.cdiv(tl.cdiv(n, S), GRAIN) * GRAIN
        lo = tl.minimum(s * c, n)
        hi = tl.minimum(lo + c, n)
    return n, lo, hi


@triton.jit
def _part_load(
    s_ptr, pk_ptr, pc_ptr, r, s, S, offs, hi, stride_s, stride_p, FROM_PARTS: tl.constexpr
):
    m = offs < hi
    if FROM_PARTS:
        base = (r * S + s).to(tl.int64) * stride_p
        key = tl.load(pk_ptr + base + offs, mask=m, other=0)
        col = tl.load(pc_ptr + base + offs, mask=m, other=0)
    else:
        x = tl.load(s_ptr + r.to(tl.int64) * stride_s + offs, mask=m, other=0.0)
        key = score_key(x)
        col = offs
    return key, col, m


@triton.jit
def _resolve(h_ptr, st_ptr, r, topk, SLOT: tl.constexpr):
    """From the row's histogram of digit SLOT + 1 (SLOT digits known, from `st`): the prefix
    with that digit appended, the rank left within it, and the digit."""
    if SLOT == 0:
        prefix = r * 0
        k = topk + r * 0
    else:
        prefix = tl.load(st_ptr + r * 8 + SLOT * 2)
        k = tl.load(st_ptr + r * 8 + SLOT * 2 + 1)
    hist = tl.load(h_ptr + r * 256 + tl.arange(0, 256))
    d, k = pick_digit(hist, k)
    return (prefix << 8) | d, k, d


@triton.jit
def _below(cum_ptr, part, d):
    """Keys of the part whose digit is below d, from its cumulative histogram."""
    return tl.where(d > 0, tl.load(cum_ptr + part * 256 + d - 1, mask=d > 0, other=0), 0)


# grid: (S, R); program (s, r): histogram of one digit over part s of row r.
@triton.jit(do_not_specialize=["topk", "S"])
def _level_kernel(
    s_ptr,
    pk_ptr,
    pc_ptr,
    cnt_ptr,
    len_ptr,
    hin_ptr,
    hout_ptr,
    cin_ptr,
    cout_ptr,
    below_ptr,
    st_ptr,
    stride_s,
    stride_p,
    topk,
    S,
    SHIFT: tl.constexpr,
    FROM_PARTS: tl.constexpr,
    GRAIN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    r = tl.program_id(1)
    n, lo, hi = _part(len_ptr, cnt_ptr, r, s, S, FROM_PARTS, GRAIN)
    if n > topk:
        bins = tl.arange(0, 256)
        part = (r * S + s).to(tl.int64)
        if SHIFT == 24:
            prefix = r * 0
        else:
            # -- the previous digit, from the row's histogram --
            slot: tl.constexpr = (16 - SHIFT) // 8
            prefix, k, d = _resolve(hin_ptr, st_ptr, r, topk, slot)
            below = _below(cin_ptr, part, d)
            if SHIFT != 16:
                below += tl.load(below_ptr + part)
            tl.store(below_ptr + part, below)  # this part's keys below the threshold so far
            if s == 0:
                tl.store(st_ptr + r * 8 + (slot + 1) * 2, prefix)
                tl.store(st_ptr + r * 8 + (slot + 1) * 2 + 1, k)
        ar = tl.arange(0, BLOCK)
        hist = tl.zeros((256,), tl.int32)
        for start in range(lo, hi, BLOCK):
            key, col, m = _part_load(
                s_ptr, pk_ptr, pc_ptr, r, s, S, start + ar, hi, stride_s, stride_p, FROM_PARTS
            )
            m = m & in_prefix(key, prefix, SHIFT)
            hist += tl.histogram(digit(key, SHIFT), 256, mask=m)
        tl.atomic_add(hout_ptr + r * 256 + bins, hist, mask=hist != 0, sem="relaxed")
        tl.store(cout_ptr + part * 256 + bins, tl.cumsum(hist, 0))


# grid: (S, R); program (s, r): the selected columns of part s, at their place in row r's output.
@triton.jit(do_not_specialize=["topk", "S"])
def _write_kernel(
    s_ptr,
    pk_ptr,
    pc_ptr,
    cnt_ptr,
    len_ptr,
    h_ptr,
    cum_ptr,
    below_ptr,
    st_ptr,
    out_ptr,
    stride_s,
    stride_p,
    stride_o,
    topk,
    S,
    FROM_PARTS: tl.constexpr,
    GRAIN: tl.constexpr,
    SP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    r = tl.program_id(1)
    n, lo, hi = _part(len_ptr, cnt_ptr, r, s, S, FROM_PARTS, GRAIN)
    out_ptr = out_ptr + r.to(tl.int64) * stride_o
    ar = tl.arange(0, BLOCK)
    if n <= topk:
        # -- every visible column, then -1 padding; each program writes one slice --
        oc = tl.cdiv(topk, S)
        o0 = s * oc
        o1 = tl.minimum(o0 + oc, topk)
        for start in range(o0, o1, BLOCK):
            offs = start + ar
            tl.store(out_ptr + offs, tl.where(offs < n, offs, -1), mask=offs < o1)
    else:
        thr_u, k1, d = _resolve(h_ptr, st_ptr, r, topk, 3)
        thr = thr_u ^ SIGN
        # -- selected keys and ties in the parts before this one --
        sp = tl.arange(0, SP)
        earlier = sp < s
        parts = r.to(tl.int64) * S + sp
        below = tl.load(below_ptr + parts, mask=earlier, other=0)
        upto = tl.load(cum_ptr + parts * 256 + d, mask=earlier, other=0)
        under = tl.load(cum_ptr + parts * 256 + d - 1, mask=earlier & (d > 0), other=0)
        before = tl.sum(below + under, 0)
        ties = tl.sum(upto - under, 0)
        n_out = before + tl.minimum(ties, k1)
        # -- this part's keys below the threshold, and its share of the first k1 ties --
        for start in range(lo, hi, BLOCK):
            key, col, m = _part_load(
                s_ptr, pk_ptr, pc_ptr, r, s, S, start + ar, hi, stride_s, stride_p, FROM_PARTS
            )
            eq = (m & (key == thr)).to(tl.int32)
            take = (m & (key < thr)) | ((eq != 0) & (ties + tl.cumsum(eq, 0) <= k1))
            t32 = take.to(tl.int32)
            tl.store(out_ptr + n_out + tl.cumsum(t32, 0) - 1, col, mask=take)
            n_out += tl.sum(t32, 0)
            ties += tl.sum(eq, 0)


def _run(out, lengths, topk, splits, config, scores=None, parts=None):
    r = out.shape[0]
    dev = out.device
    cfg = config or (DEFAULT_SPLIT if dev.type == "cuda" else INTERPRET_SPLIT)
    # Per digit level: the rows' histograms (summed by atomics, so zeroed) and the parts'
    # cumulative histograms.
    hist = torch.zeros((4, r, 256), dtype=torch.int32, device=dev)
    cum = torch.empty((4, r * splits, 256), dtype=torch.int32, device=dev)
    below = torch.empty(r * splits, dtype=torch.int32, device=dev)
    state = torch.empty((r, 4, 2), dtype=torch.int32, device=dev)
    if parts is not None:
        pk, pc, cnt = parts
        src = (pk, pk, pc, cnt)
        stride_s, stride_p = 0, pk.stride(0)
    else:
        src = (scores, scores, scores, lengths)  # unused pointers where FROM_PARTS is False
        stride_s, stride_p = scores.stride(0), 0
    grid = (splits, r)
    common = dict(
        FROM_PARTS=parts is not None,
        GRAIN=GRAIN,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
    )
    for level, shift in enumerate((24, 16, 8, 0)):
        prev = max(level - 1, 0)
        _level_kernel[grid](
            *src,
            lengths,
            hist[prev],
            hist[level],
            cum[prev],
            cum[level],
            below,
            state,
            stride_s,
            stride_p,
            topk,
            splits,
            SHIFT=shift,
            **common,
        )
    _write_kernel[grid](
        *src,
        lengths,
        hist[3],
        cum[3],
        below,
        state,
        out,
        stride_s,
        stride_p,
        out.stride(0),
        topk,
        splits,
        SP=max(2, next_pow2(splits)),
        **common,
    )
    return out


def topk_rows_split(scores, lengths, out, topk: int, splits: int, config: dict | None = None):
    """Top-k of rows of `scores` [R, W] fp32 (row r visible up to lengths[r]) into out [R, topk]."""
    return _run(out, lengths, topk, splits, config, scores=scores)


def topk_parts(keys, cols, counts, lengths, out, topk: int, splits: int, config=None):
    """Top-k over parts: keys/cols [R * splits, CS] int32 (keys from keys.score_key), counts
    [R * splits] entries used per part; lengths [R] visible keys per row (<= topk: all of them)."""
    return _run(out, lengths, topk, splits, config, parts=(keys, cols, counts))
