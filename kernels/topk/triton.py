"""Row top-k in Triton: one program per row (many rows), or several per row (few rows).

Why not torch.topk: at topk 2048 over 64K-wide rows it costs more than the indexer scores
themselves. Why not a plain radix select per row: tl.histogram lowers to ballots whose cost grows
with the bin count (~800 instructions per element at 2048 bins, measured 140 ms at 64K), so only
narrow histograms over few elements are cheap.

Keys: kernels/topk/keys.py (exact, one per distinct score), so the top-k are the k smallest keys
and ties go to the lower column, exactly as the reference.

One program per row (this file), when the row is longer than `cap`:
  1. sample SAMPLE keys at a fixed stride and sort them; the sample ranks around k*SAMPLE/n,
     widened by Z binomial standard deviations, give keys a < b that bracket the k-th key;
  2. one pass over the row writes every key < a (surely selected) and copies keys in [a, b]
     with their columns into a per-row candidate buffer;
  3. if the bracket held (fewer than k below a, at least k up to b, at most cap in between),
     four 8-bit radix levels over the candidates find the exact threshold key and the last pass
     writes the rest (ties: first in scan order = lowest column). Otherwise (a sample miss, rare)
     the same exact select runs over the whole row and rewrites it. Rows of at most cap keys go
     there directly.
Several programs per row (kernels/topk/split.py): when rows are few, so that one row's work is
spread over the GPU instead of waiting on one SM.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2
from kernels.topk import split
from kernels.topk.keys import KEY_MAX, KEY_MIN, SIGN, digit, in_prefix, pick_digit, score_key

CAP = 4096  # smallest candidate buffer per row (keys and columns); wider rows get more
SAMPLE = 2048
Z = 3.5  # a bracket miss per side has probability ~2e-4 per row
CONFIGS = [
    {"BLOCK": 2048, "num_warps": 8},
    {"BLOCK": 1024, "num_warps": 4},
    {"BLOCK": 2048, "num_warps": 4},
    {"BLOCK": 4096, "num_warps": 8},
]
DEFAULT = CONFIGS[0]
# The interpreter pays per element of every block and sort, masked or not.
INTERPRET = {"BLOCK": 256, "num_warps": 4}
INTERPRET_SAMPLE = 256


@triton.jit
def _load(row_ptr, ck_ptr, ci_ptr, offs, n, FROM_ROW: tl.constexpr):
    m = offs < n
    if FROM_ROW:
        key = score_key(tl.load(row_ptr + offs, mask=m, other=0.0))
        col = offs
    else:
        key = tl.load(ck_ptr + offs, mask=m, other=0)
        col = tl.load(ci_ptr + offs, mask=m, other=0)
    return key, col, m


@triton.jit
def radix_level(
    row_ptr,
    ck_ptr,
    ci_ptr,
    n,
    prefix,
    k,
    SHIFT: tl.constexpr,
    FROM_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One radix digit among keys whose higher digits equal `prefix`: the digit holding the k-th
    smallest, and how many are still needed from it."""
    ar = tl.arange(0, BLOCK)
    hist = tl.zeros((256,), tl.int32)
    for start in range(0, n, BLOCK):
        key, col, m = _load(row_ptr, ck_ptr, ci_ptr, start + ar, n, FROM_ROW)
        m = m & in_prefix(key, prefix, SHIFT)
        hist += tl.histogram(digit(key, SHIFT), 256, mask=m)
    d, k = pick_digit(hist, k)
    return (prefix << 8) | d, k


@triton.jit
def threshold(row_ptr, ck_ptr, ci_ptr, n, k, FROM_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """The k-th smallest key of the source (a scores row, or a key buffer), and how many keys
    equal to it are among the k smallest."""
    p, k1 = radix_level(row_ptr, ck_ptr, ci_ptr, n, 0, k, 24, FROM_ROW, BLOCK)
    p, k1 = radix_level(row_ptr, ck_ptr, ci_ptr, n, p, k1, 16, FROM_ROW, BLOCK)
    p, k1 = radix_level(row_ptr, ck_ptr, ci_ptr, n, p, k1, 8, FROM_ROW, BLOCK)
    p, k1 = radix_level(row_ptr, ck_ptr, ci_ptr, n, p, k1, 0, FROM_ROW, BLOCK)
    return p ^ SIGN, k1


@triton.jit
def _select(
    row_ptr, ck_ptr, ci_ptr, out_ptr, n, k, n_out, FROM_ROW: tl.constexpr, BLOCK: tl.constexpr
):
    """Write the columns of the k smallest keys of the source to out[n_out : n_out + k]."""
    thr, k1 = threshold(row_ptr, ck_ptr, ci_ptr, n, k, FROM_ROW, BLOCK)
    # -- keys below the threshold, then the first k1 ties --
    ar = tl.arange(0, BLOCK)
    ties = tl.full((), 0, tl.int32)
    for start in range(0, n, BLOCK):
        key, col, m = _load(row_ptr, ck_ptr, ci_ptr, start + ar, n, FROM_ROW)
        eq = (m & (key == thr)).to(tl.int32)
        take = (m & (key < thr)) | ((eq != 0) & (ties + tl.cumsum(eq, 0) <= k1))
        t32 = take.to(tl.int32)
        tl.store(out_ptr + n_out + tl.cumsum(t32, 0) - 1, col, mask=take)
        n_out += tl.sum(t32, 0)
        ties += tl.sum(eq, 0)


# grid: (R,); each program: one row, streamed in BLOCK-wide slices.
@triton.jit(do_not_specialize=["topk", "cap"])
def _topk_rows_kernel(
    s_ptr,
    len_ptr,
    out_ptr,
    ck_ptr,
    ci_ptr,
    miss_ptr,
    stride_s,
    stride_o,
    stride_c,
    topk,
    cap,
    z,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(len_ptr + row)
    row_ptr = s_ptr + row * stride_s
    out_ptr = out_ptr + row * stride_o
    ck_ptr = ck_ptr + row * stride_c
    ci_ptr = ci_ptr + row * stride_c
    ar = tl.arange(0, BLOCK)
    if n <= topk:
        # -- every visible column is selected, then -1 padding --
        for start in range(0, topk, BLOCK):
            offs = start + ar
            tl.store(out_ptr + offs, tl.where(offs < n, offs, -1), mask=offs < topk)
    else:
        zero = n * 0
        done = zero
        if n > cap:
            # -- bracket the k-th key from a strided sample --
            sa = tl.arange(0, SAMPLE)
            pos = (sa.to(tl.int64) * n) // SAMPLE
            sample = tl.sort(score_key(tl.load(row_ptr + pos)))
            r = topk.to(tl.float32) * SAMPLE / n.to(tl.float32)
            lo = (r - z * tl.sqrt(r)).to(tl.int32) - 1
            hi = (r + z * tl.sqrt(r)).to(tl.int32) + 2
            key_a = tl.where(lo >= 0, tl.sum(tl.where(sa == lo, sample, 0), 0), KEY_MIN)
            key_b = tl.where(hi < SAMPLE, tl.sum(tl.where(sa == hi, sample, 0), 0), KEY_MAX)
            # -- one pass: write the sure keys, gather the bracket --
            n_out = tl.full((), 0, tl.int32)
            n_c = tl.full((), 0, tl.int32)
            x = tl.load(row_ptr + ar, mask=ar < n, other=0.0)
            for start in range(0, n, BLOCK):
                # the next block's load is issued before this block's work hides its latency
                nxt = start + BLOCK + ar
                x_next = tl.load(row_ptr + nxt, mask=nxt < n, other=0.0)
                offs = start + ar
                m = offs < n
                key = score_key(x)
                x = x_next
                sure = (m & (key < key_a)).to(tl.int32)
                slot = n_out + tl.cumsum(sure, 0) - 1
                tl.store(out_ptr + slot, offs, mask=(sure != 0) & (slot < topk))
                n_out += tl.sum(sure, 0)
                win = (m & (key >= key_a) & (key <= key_b)).to(tl.int32)
                cslot = n_c + tl.cumsum(win, 0) - 1
                cmask = (win != 0) & (cslot < cap)
                tl.store(ck_ptr + cslot, key, mask=cmask)
                tl.store(ci_ptr + cslot, offs, mask=cmask)
                n_c += tl.sum(win, 0)
            ok = (n_out < topk) & (n_out + n_c >= topk) & (n_c <= cap)
            if ok:
                tl.debug_barrier()  # the candidates written above are read by other threads
                _select(row_ptr, ck_ptr, ci_ptr, out_ptr, n_c, topk - n_out, n_out, False, BLOCK)
            done = ok.to(tl.int32)
        if done == 0:
            # -- short row, or the sample missed: exact select over the whole row --
            if n > cap:
                tl.atomic_add(miss_ptr, 1)  # counted for tests and the bench
            _select(row_ptr, ck_ptr, ci_ptr, out_ptr, n, topk, zero, True, BLOCK)


def cap_for(width: int, topk: int, sample: int = SAMPLE, z: float = Z) -> int:
    """Candidate buffer that holds the sampled bracket of a `width`-key row with room to spare:
    the bracket spans ~2z+3 sd of ~sqrt(topk * width / sample) keys each (4096 at 64K keys,
    8192 at 200K, where 4096 overflowed about one row in seven)."""
    sd = math.sqrt(topk * max(width, 1) / sample)
    return max(CAP, next_pow2(int((2 * z + 5) * sd + 3 * width / sample)))


def scratch(rows: int, device: torch.device, cap: int | None = None):
    """Candidate buffers (keys, columns) for `rows` rows; callers may reuse them across launches."""
    cap = cap or CAP
    return (
        torch.empty((rows, cap), dtype=torch.int32, device=device),
        torch.empty((rows, cap), dtype=torch.int32, device=device),
    )


def launch(
    scores,
    lengths,
    out,
    topk: int,
    cand=None,
    cap: int | None = None,
    config: dict | None = None,
    z: float = Z,
    misses: torch.Tensor | None = None,
    splits: int | None = None,
):
    """Top-k of rows of `scores` into `out` [R, topk] int32. `splits`: programs per row (None:
    chosen from the shape, split.splits_for; 1: one program per row, the sampled bracket). `cand`
    buffers fix the one-program capacity; `misses` (int32 [1]), if given, counts rows whose
    sampled bracket missed (the slow exact path ran; the split path has no misses)."""
    r, width = scores.shape
    if r == 0:
        return out
    assert scores.stride(1) == 1 and out.stride(1) == 1
    cuda = scores.device.type == "cuda"
    if splits is None:
        splits = split.splits_for(r, width, scores.device)
    if splits > 1:
        return split.topk_rows_split(scores, lengths, out, topk, splits, config=config)
    sample = SAMPLE if cuda else INTERPRET_SAMPLE
    cap = cand[0].shape[1] if cand is not None else (cap or cap_for(width, topk, sample, z))
    cfg = config or (DEFAULT if cuda else INTERPRET)
    ck, ci = cand if cand is not None else scratch(r, scores.device, cap)
    assert ck.shape[0] >= r and ck.shape[1] == cap >= 1
    if misses is None:
        misses = torch.zeros(1, dtype=torch.int32, device=scores.device)
    _topk_rows_kernel[(r,)](
        scores,
        lengths,
        out,
        ck,
        ci,
        misses,
        scores.stride(0),
        out.stride(0),
        ck.stride(0),
        topk,
        cap,
        z,
        SAMPLE=sample,
        BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
    )
    return out


def topk_rows(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    topk: int,
    cap: int | None = None,
    config: dict | None = None,
    z: float = Z,
    misses: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    scores = scores.contiguous()
    out = torch.empty((scores.shape[0], topk), dtype=torch.int32, device=scores.device)
    return launch(
        scores, lengths, out, topk, cap=cap, config=config, z=z, misses=misses, splits=splits
    )
