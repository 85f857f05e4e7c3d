"""Exact order-preserving int32 keys of fp32 scores, and their radix digits (Triton helpers).

key(x) ascends as x descends, one key per distinct score, -0.0 == +0.0: the top-k scores are the
k smallest keys, and equal scores get equal keys, so "ties to the lower column" is decided by
column alone (the reference's stable sort). Radix digits are taken from u = key ^ SIGN, whose
unsigned order equals the signed order of the key: four 8-bit digits, most significant first
(SHIFT 24, 16, 8, 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

# constexpr: Triton kernels may only read constexpr globals
SIGN = tl.constexpr(-2147483648)  # int32 with only bit 31 set
KEY_MIN = tl.constexpr(-2147483648)
KEY_MAX = tl.constexpr(2147483647)


@triton.jit
def score_key(x):
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0
    b = x.to(tl.int32, bitcast=True)
    o = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # signed int order == float order
    return ~o


@triton.jit
def digit(key, SHIFT: tl.constexpr):
    return ((key ^ SIGN) >> SHIFT) & 255


@triton.jit
def in_prefix(key, prefix, SHIFT: tl.constexpr):
    """Whether the digits above SHIFT equal `prefix` (always true for the first digit)."""
    if SHIFT == 24:
        return key == key
    else:
        return (((key ^ SIGN) >> (SHIFT + 8)) & ((1 << (24 - SHIFT)) - 1)) == prefix


@triton.jit
def pick_digit(hist, k):
    """The digit holding the k-th smallest key of a 256-bin histogram, and the rank left in it."""
    bins = tl.arange(0, 256)
    d = tl.min(tl.where(tl.cumsum(hist, 0) >= k, bins, 256), 0)
    return d, k - tl.sum(tl.where(bins < d, hist, 0), 0)
