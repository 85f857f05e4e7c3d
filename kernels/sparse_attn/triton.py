"""Sparse attention over indexer-selected keys in Triton (spec: kernels/sparse_attn/__init__.py).

One kernel for MLA in absorbed form and for grouped-query attention. A program owns one token and
up to BH query heads of one KV head (the heads share the token's index set, so each gathered key
block feeds one [BH, BN] MMA), and walks its index list in BN-wide blocks:
    s = q[:, :DM] @ k[:, :DM]^T (+ q[:, DM:] @ k[:, DM:]^T)   online softmax in fp32   acc += p @ v
DM is the largest power of two in the key dim (512 of MLA's 576; the 64 rope dims are the tail).
MLA's value is the latent part of the same row (v_cache is a view of k_cache): V_IS_K reuses the
gathered key block instead of loading it twice.

Decode has too few tokens to fill the GPU (batch 64 x 1 head group = 64 programs), so its index
list is split over a third grid axis and a combine kernel merges the partial softmaxes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2, num_sms

LOG2E = 1.4426950408889634
# Wide heads (MLA 576/512): the fp32 [BH, 512] accumulator wants 8 warps and small key blocks.
WIDE_CONFIGS = [
    {"BN": 64, "num_warps": 8, "num_stages": 2},
    {"BN": 32, "num_warps": 8, "num_stages": 2},
    {"BN": 32, "num_warps": 8, "num_stages": 3},
]
# Measured in kernels.bench only: Triton's automatic warp specialisation is documented for
# Blackwell matmul loops; whether it compiles and pays for this loop on Hopper is an experiment.
EXPERIMENTAL_WIDE = [{"BN": 64, "num_warps": 8, "num_stages": 2, "WS": True}]
NARROW_CONFIGS = [
    {"BN": 64, "num_warps": 4, "num_stages": 2},
    {"BN": 128, "num_warps": 8, "num_stages": 2},
    {"BN": 32, "num_warps": 4, "num_stages": 3},
]
# Chosen from the H200 sweeps of kernels/bench.py (benchmarks/README.md).
DEFAULT_WIDE = WIDE_CONFIGS[0]
DEFAULT_WIDE_DECODE = WIDE_CONFIGS[0]
DEFAULT_NARROW = NARROW_CONFIGS[0]
INTERPRET_CONFIG = {"BN": 16, "num_warps": 4, "num_stages": 1}
MAX_BH = 64  # query heads per program (MMA M side); more heads -> more programs per KV head


# grid: (T, Hkv * head groups, splits); each program: one token x BH heads x one slice of topk.
@triton.jit(do_not_specialize=["topk", "per_split"])
def _sparse_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_ptr,
    idx_ptr,
    o_ptr,
    ml_ptr,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_it,
    stride_ot,
    stride_oh,
    stride_os,
    stride_mt,
    stride_mh,
    topk,
    per_split,
    scale_log2,
    G: tl.constexpr,
    BH: tl.constexpr,
    PS: tl.constexpr,
    DM: tl.constexpr,
    DT: tl.constexpr,
    DT_REAL: tl.constexpr,
    DV: tl.constexpr,
    DV_REAL: tl.constexpr,
    V_IS_K: tl.constexpr,
    BN: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    SPLIT: tl.constexpr,
    WS: tl.constexpr,
):
    n_hg: tl.constexpr = (G + BH - 1) // BH
    pid_t = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    kvh = pid_h // n_hg
    offs_g = (pid_h % n_hg) * BH + tl.arange(0, BH)
    hmask = offs_g < G
    heads = kvh * G + offs_g
    if HAS_SEQ:
        b = tl.load(seq_ptr + pid_t).to(tl.int64)
    else:
        b = pid_t
    # -- load the query heads once --
    offs_dm = tl.arange(0, DM)
    q_row = q_ptr + pid_t * stride_qt + heads[:, None] * stride_qh
    q_m = tl.load(q_row + offs_dm[None, :], mask=hmask[:, None], other=0.0)
    if DT > 0:
        offs_dt = tl.arange(0, DT)
        q_t = tl.load(
            q_row + DM + offs_dt[None, :],
            mask=hmask[:, None] & (offs_dt[None, :] < DT_REAL),
            other=0.0,
        )
    offs_dv = tl.arange(0, DV)
    m_i = tl.full((BH,), float("-inf"), tl.float32)
    l_i = tl.zeros((BH,), tl.float32)
    acc = tl.zeros((BH, DV), tl.float32)
    start = pid_s * per_split
    end = tl.minimum(start + per_split, topk)
    for n0 in tl.range(start, end, BN, warp_specialize=WS):
        # -- translate the block's logical positions to cache rows --
        offs_n = n0 + tl.arange(0, BN)
        ind = tl.load(idx_ptr + pid_t * stride_it + offs_n, mask=offs_n < end, other=-1)
        valid = ind >= 0
        ind = tl.maximum(ind, 0)
        page = tl.load(bt_ptr + b * stride_bt + ind // PS, mask=valid, other=0).to(tl.int64)
        k_row = k_ptr + page * stride_kp + (ind % PS) * stride_ks + kvh * stride_kh
        k_m = tl.load(k_row[:, None] + offs_dm[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_m, tl.trans(k_m))
        if DT > 0:
            k_t = tl.load(
                k_row[:, None] + DM + offs_dt[None, :],
                mask=valid[:, None] & (offs_dt[None, :] < DT_REAL),
                other=0.0,
            )
            s += tl.dot(q_t, tl.trans(k_t))
        # -- online softmax in the log2 domain; -1 slots never contribute --
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if V_IS_K:
            v = k_m
        else:
            v_row = v_ptr + page * stride_vp + (ind % PS) * stride_vs + kvh * stride_vh
            v = tl.load(
                v_row[:, None] + offs_dv[None, :],
                mask=valid[:, None] & (offs_dv[None, :] < DV_REAL),
                other=0.0,
            )
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out_mask = hmask[:, None] & (offs_dv[None, :] < DV_REAL)
    if SPLIT:
        # -- partial (unnormalised) result of this slice, merged by _combine_kernel --
        o_row = o_ptr + pid_t * stride_ot + heads[:, None] * stride_oh + pid_s * stride_os
        tl.store(o_row + offs_dv[None, :], acc, mask=out_mask)
        ml = ml_ptr + pid_t * stride_mt + heads * stride_mh + pid_s * 2
        tl.store(ml, m_i, mask=hmask)
        tl.store(ml + 1, l_i, mask=hmask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no valid index -> zeros
        o_row = o_ptr + pid_t * stride_ot + heads[:, None] * stride_oh
        tl.store(o_row + offs_dv[None, :], out.to(o_ptr.dtype.element_ty), mask=out_mask)


# grid: (T, H); each program merges the S partial softmaxes of one (token, head).
@triton.jit(do_not_specialize=["n_split"])
def _combine_kernel(
    part_ptr,
    ml_ptr,
    o_ptr,
    n_split,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_mt,
    stride_mh,
    stride_ot,
    stride_oh,
    SP: tl.constexpr,
    DV: tl.constexpr,
    DV_REAL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SP)
    offs_dv = tl.arange(0, DV)
    smask = offs_s < n_split
    ml = ml_ptr + t * stride_mt + h * stride_mh + offs_s * 2
    m = tl.load(ml, mask=smask, other=float("-inf"))
    lse = tl.load(ml + 1, mask=smask, other=0.0)
    m_all = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    denom = tl.sum(w * lse, 0)
    part = tl.load(
        part_ptr + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_dv[None, :],
        mask=smask[:, None] & (offs_dv[None, :] < DV_REAL),
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        o_ptr + t * stride_ot + h * stride_oh + offs_dv,
        out.to(o_ptr.dtype.element_ty),
        mask=offs_dv < DV_REAL,
    )


def _dims(dk: int, dv: int):
    if dk < 16 or dv < 1:
        raise ValueError(f"sparse_attn (triton): key dim must be >= 16, got {dk}")
    dm = 1 << (dk.bit_length() - 1)
    dt = dk - dm
    return dm, (max(16, next_pow2(dt)) if dt else 0), dt, max(16, next_pow2(dv))


def _v_is_k(k_cache, v_cache, dm: int) -> bool:
    return (
        v_cache.data_ptr() == k_cache.data_ptr()
        and v_cache.stride() == k_cache.stride()
        and v_cache.shape[3] == dm
    )


def pick_config(dk: int, device: torch.device, decode: bool = False) -> dict:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    if dk >= 256:
        return DEFAULT_WIDE_DECODE if decode else DEFAULT_WIDE
    return DEFAULT_NARROW


def decode_splits(
    tokens: int, programs_per_token: int, topk: int, bn: int, device: torch.device
) -> int:
    """Slices of the index list per token: as many as fit in one wave of one program per SM
    (at batch 64 on an H200, 2 slices beat 3, whose second partial wave costs more than the
    slices gain, and 4; benchmarks/README.md)."""
    want = num_sms(device) // max(1, tokens * programs_per_token)
    return max(1, min(cdiv(topk, bn), want))


def _run(q, k_cache, v_cache, block_tables, seq_of, indices, scale, splits, config):
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("sparse_attn (triton): q and the caches need a contiguous last dimension")
    indices = indices if indices.stride(1) == 1 else indices.contiguous()
    t, h, dk = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    g = h // hkv
    dm, dt_pad, dt, dv_pad = _dims(dk, dv)
    cfg = config or pick_config(dk, q.device)
    bn = cfg["BN"]
    bh = min(MAX_BH, max(16, next_pow2(g)))
    n_hg = cdiv(g, bh)
    topk = indices.shape[1]
    out = torch.empty((t, h, dv), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    if splits is None:
        splits = 1
    per_split = cdiv(cdiv(topk, bn), splits) * bn
    splits = max(1, cdiv(topk, per_split))
    if splits > 1:
        part = torch.empty((t, h, splits, dv_pad), dtype=torch.float32, device=q.device)
        ml = torch.empty((t, h, splits, 2), dtype=torch.float32, device=q.device)
        o_arg, o_strides = part, (part.stride(0), part.stride(1), part.stride(2))
        ml_strides = (ml.stride(0), ml.stride(1))
    else:
        ml = out  # unused
        o_arg, o_strides, ml_strides = out, (out.stride(0), out.stride(1), 0), (0, 0)
    v_is_k = _v_is_k(k_cache, v_cache, dm)
    _sparse_attn_kernel[(t, hkv * n_hg, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_of if seq_of is not None else block_tables,
        indices,
        o_arg,
        ml,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        indices.stride(0),
        *o_strides,
        *ml_strides,
        topk,
        per_split,
        scale * LOG2E,
        G=g,
        BH=bh,
        PS=k_cache.shape[1],
        DM=dm,
        DT=dt_pad,
        DT_REAL=dt,
        DV=dv_pad,
        DV_REAL=dv,
        V_IS_K=v_is_k,
        BN=bn,
        HAS_SEQ=seq_of is not None,
        SPLIT=splits > 1,
        WS=cfg.get("WS", False),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _combine_kernel[(t, h)](
            part,
            ml,
            out,
            splits,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            ml.stride(0),
            ml.stride(1),
            out.stride(0),
            out.stride(1),
            SP=max(2, next_pow2(splits)),
            DV=dv_pad,
            DV_REAL=dv,
            num_warps=4,
        )
    return out


def sparse_attn_prefill(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    seq_lens,
    indices,
    scale: float,
    config: dict | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    t, b = q.shape[0], seq_lens.shape[0]
    nq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    # Sequence of each token, computed on the device (no host sync).
    seq_of = torch.repeat_interleave(
        torch.arange(b, device=q.device, dtype=torch.int32), nq, output_size=t
    )
    return _run(q, k_cache, v_cache, block_tables, seq_of, indices, scale, splits, config)


def sparse_attn_decode(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    indices,
    scale: float,
    config: dict | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    cfg = config or pick_config(q.shape[2], q.device, decode=True)
    if splits is None:
        g = q.shape[1] // k_cache.shape[2]
        per_token = k_cache.shape[2] * cdiv(g, min(MAX_BH, max(16, next_pow2(g))))
        splits = decode_splits(q.shape[0], per_token, indices.shape[1], cfg["BN"], q.device)
    return _run(q, k_cache, v_cache, block_tables, None, indices, scale, splits, cfg)
