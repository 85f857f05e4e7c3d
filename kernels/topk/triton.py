"""Row top-k by radix select on the distance to the row maximum (Triton).

Why not torch.topk: at topk 2048 over 64K-wide rows it costs more than the indexer scores
themselves (h200-anchor.md). A radix select reads each row twice in the common case.

Key: d = rowmax - score >= 0, as fp32 bits (order-preserving for non-negative floats), so the
top-k scores are the k smallest keys. Measuring from the maximum makes the first-level bins
shift-invariant: rows whose scores share a large offset still spread over many bins.

Per row (one program):
  1. histogram of key bits [30:20] (2048 bins) over the row -> the bin b1 holding the k-th
     smallest key; keys in lower bins are selected outright;
  2. second pass: write those selected columns, and copy the keys of bin b1 with their columns
     into a per-row candidate buffer when at most CAP of them (the usual case);
  3. bits [19:9] and [8:0] are resolved by two more histograms over the candidates (or, when
     bin b1 overflowed the buffer, over the row again with a bin-b1 filter); the final pass
     writes keys below the exact threshold key and the first ties in scan order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bins of the three radix levels over the 31 useful key bits (bit 31 is 0: keys are >= 0).
NB1, NB2, NB3 = tl.constexpr(2048), tl.constexpr(2048), tl.constexpr(512)
SH1, SH2 = tl.constexpr(20), tl.constexpr(9)
# Candidate buffer per row: the first-level threshold bin usually holds ~1-2K keys at topk 2048.
CAP = 4096
BLOCK = 2048
INTERPRET_BLOCK = 256  # the interpreter pays per element of every block, masked or not
NUM_WARPS = 8


@triton.jit
def _key(x, mx):
    d = tl.maximum(mx - x, 0.0)  # the max clamp also maps -0.0 to +0.0
    return d.to(tl.int32, bitcast=True)


@triton.jit
def _pick(hist, k, NB: tl.constexpr):
    """Smallest digit whose cumulative count reaches k -> (digit, still needed from it)."""
    bins = tl.arange(0, NB)
    cs = tl.cumsum(hist, 0)
    d = tl.min(tl.where(cs >= k, bins, NB), 0)
    below = tl.sum(tl.where(bins < d, hist, 0), 0)
    return d, k - below


@triton.jit
def _load(row_ptr, ck_ptr, ci_ptr, offs, n, mx, d1, FROM_ROW: tl.constexpr):
    """Keys and columns of one block of the source: the row (filtered to bin d1) or the
    candidate buffer (all in bin d1 by construction)."""
    m = offs < n
    if FROM_ROW:
        key = _key(tl.load(row_ptr + offs, mask=m, other=0.0), mx)
        col = offs
        m = m & ((key >> SH1) == d1)
    else:
        key = tl.load(ck_ptr + offs, mask=m, other=0)
        col = tl.load(ci_ptr + offs, mask=m, other=0)
    return key, col, m


@triton.jit
def _finish(row_ptr, ck_ptr, ci_ptr, out_ptr, n, mx, d1, k1, n_out,
            FROM_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Resolve the low 20 key bits inside bin d1 and write the k1 columns still needed."""
    ar = tl.arange(0, BLOCK)
    h2 = tl.zeros((NB2,), tl.int32)
    for start in range(0, n, BLOCK):
        key, col, m = _load(row_ptr, ck_ptr, ci_ptr, start + ar, n, mx, d1, FROM_ROW)
        h2 += tl.histogram((key >> SH2) & (NB2 - 1), NB2, mask=m)
    d2, k2 = _pick(h2, k1, NB2)
    h3 = tl.zeros((NB3,), tl.int32)
    for start in range(0, n, BLOCK):
        key, col, m = _load(row_ptr, ck_ptr, ci_ptr, start + ar, n, mx, d1, FROM_ROW)
        m = m & (((key >> SH2) & (NB2 - 1)) == d2)
        h3 += tl.histogram(key & (NB3 - 1), NB3, mask=m)
    d3, k3 = _pick(h3, k2, NB3)
    thr = (d1 << SH1) | (d2 << SH2) | d3
    ties = tl.full((), 0, tl.int32)
    for start in range(0, n, BLOCK):
        key, col, m = _load(row_ptr, ck_ptr, ci_ptr, start + ar, n, mx, d1, FROM_ROW)
        eq = (m & (key == thr)).to(tl.int32)
        take = (m & (key < thr)) | ((eq != 0) & (ties + tl.cumsum(eq, 0) <= k3))
        t32 = take.to(tl.int32)
        tl.store(out_ptr + n_out + tl.cumsum(t32, 0) - 1, col, mask=take)
        n_out += tl.sum(t32, 0)
        ties += tl.sum(eq, 0)


# grid: (R,); each program: one row, streamed in BLOCK-wide slices.
@triton.jit(do_not_specialize=["topk", "cap"])
def _topk_rows_kernel(s_ptr, len_ptr, mx_ptr, out_ptr, ck_ptr, ci_ptr,
                      stride_s, stride_o, stride_c, topk, cap, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(len_ptr + row)
    row_ptr = s_ptr + row * stride_s
    out_ptr = out_ptr + row * stride_o
    ar = tl.arange(0, BLOCK)
    if n <= topk:
        # -- every visible column is selected, then -1 padding --
        for start in range(0, topk, BLOCK):
            offs = start + ar
            tl.store(out_ptr + offs, tl.where(offs < n, offs, -1), mask=offs < topk)
    else:
        mx = tl.load(mx_ptr + row)
        ck_ptr = ck_ptr + row * stride_c
        ci_ptr = ci_ptr + row * stride_c
        # -- level 1: histogram of the top key bits over the whole row --
        h1 = tl.zeros((NB1,), tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + ar
            m = offs < n
            key = _key(tl.load(row_ptr + offs, mask=m, other=0.0), mx)
            h1 += tl.histogram(key >> SH1, NB1, mask=m)
        d1, k1 = _pick(h1, topk, NB1)
        fits = tl.sum(tl.where(tl.arange(0, NB1) == d1, h1, 0), 0) <= cap
        # -- write the bins below d1; gather bin d1 into the candidate buffer --
        n_out = tl.full((), 0, tl.int32)
        n_cand = tl.full((), 0, tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + ar
            m = offs < n
            key = _key(tl.load(row_ptr + offs, mask=m, other=0.0), mx)
            dig = key >> SH1
            sel = m & (dig < d1)
            s32 = sel.to(tl.int32)
            tl.store(out_ptr + n_out + tl.cumsum(s32, 0) - 1, offs, mask=sel)
            n_out += tl.sum(s32, 0)
            cand = m & (dig == d1) & fits
            c32 = cand.to(tl.int32)
            slot = n_cand + tl.cumsum(c32, 0) - 1
            tl.store(ck_ptr + slot, key, mask=cand)
            tl.store(ci_ptr + slot, offs, mask=cand)
            n_cand += tl.sum(c32, 0)
        # -- the k1 keys still needed all lie in bin d1 --
        if fits:
            _finish(row_ptr, ck_ptr, ci_ptr, out_ptr, n_cand, mx, d1, k1, n_out, False, BLOCK)
        else:
            _finish(row_ptr, ck_ptr, ci_ptr, out_ptr, n, mx, d1, k1, n_out, True, BLOCK)


def scratch(rows: int, device: torch.device, cap: int = CAP) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate buffers (keys, columns) for `rows` rows; callers may reuse them across launches."""
    return (torch.empty((rows, cap), dtype=torch.int32, device=device),
            torch.empty((rows, cap), dtype=torch.int32, device=device))


def launch(scores, lengths, row_max, out, topk: int, cand=None, cap: int = CAP,
           block: int | None = None) -> torch.Tensor:
    """Top-k of rows of `scores` into `out` [R, topk] int32, given each row's visible maximum
    (`row_max` [R] fp32, only read for rows longer than topk)."""
    r = scores.shape[0]
    if r == 0:
        return out
    assert scores.stride(1) == 1 and out.stride(1) == 1 and cap >= 1
    block = block or (BLOCK if scores.device.type == "cuda" else INTERPRET_BLOCK)
    ck, ci = cand if cand is not None else scratch(r, scores.device, cap)
    assert ck.shape[0] >= r and ck.shape[1] == cap
    _topk_rows_kernel[(r,)](scores, lengths, row_max, out, ck, ci, scores.stride(0),
                            out.stride(0), ck.stride(0), topk, cap, BLOCK=block,
                            num_warps=NUM_WARPS)
    return out


def topk_rows(scores: torch.Tensor, lengths: torch.Tensor, topk: int, cap: int = CAP,
              block: int | None = None) -> torch.Tensor:
    scores = scores.contiguous()
    cols = torch.arange(scores.shape[1], device=scores.device)
    visible = cols[None, :] < lengths[:, None]
    row_max = scores.masked_fill(~visible, float("-inf")).amax(1) if scores.shape[1] else \
        torch.zeros(scores.shape[0], device=scores.device)
    out = torch.empty((scores.shape[0], topk), dtype=torch.int32, device=scores.device)
    return launch(scores, lengths, row_max, out, topk, cap=cap, block=block)
