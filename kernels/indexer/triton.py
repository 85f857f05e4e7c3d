"""Lightning-indexer scores + top-k in Triton (spec: kernels/indexer/__init__.py).

Two stages per block of query rows, so memory stays bounded at any context length:
  1. a logits kernel writes fp32 scores of the rows' visible keys into a scratch buffer (rows x
     width <= SCORE_BUDGET bytes) and each row's maximum (atomic max; top-k keys are distances
     from it);
  2. the radix-select kernel of kernels/topk picks each row's top-k.

Prefill logits, grid (key tiles, query tiles), key tiles fastest so that the programs running at
one time share a query tile (q is re-read per head from L2, the smaller key tile stays put):
    acc[BM, BN] = sum_h w[rows, h] * relu(q[rows, h, :] @ k[keys, :]^T)      (x k_scale if FP8)
Decode logits, grid (key tiles, sequences): the HI heads of the one query form the MMA's M side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, next_pow2
from kernels.indexer.plan import (  # noqa: F401  (re-exported: kernels.bench and tests use them)
    INTERPRET_PREFILL,
    MAX_ROWS,
    PREFILL_CONFIGS,
    SCORE_BUDGET,
    PrefillTiles,
    plan_prefill,
    prefill_config,
)
from kernels.topk import triton as topk_tri

DECODE_CONFIGS = [
    {"BN": 128, "num_warps": 4, "num_stages": 2},
    {"BN": 256, "num_warps": 8, "num_stages": 2},
    {"BN": 64, "num_warps": 4, "num_stages": 2},
]
DEFAULT_DECODE = DECODE_CONFIGS[0]
INTERPRET_DECODE = {"BN": 32, "num_warps": 4, "num_stages": 1}


# grid: (cdiv(width, BN), query tiles of this group); each program: BM rows x BN keys, all heads.
@triton.jit(do_not_specialize=["row0"])
def _prefill_logits_kernel(
    q_ptr,
    wt_ptr,
    k_ptr,
    ks_ptr,
    bt_ptr,
    tile_ptr,
    s_ptr,
    mx_ptr,
    row0,
    stride_qt,
    stride_qh,
    stride_wh,
    stride_kp,
    stride_ks,
    stride_sp,
    stride_bt,
    stride_s,
    H: tl.constexpr,
    D: tl.constexpr,
    PS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    seq = tl.load(tile_ptr + pid_m * 4).to(tl.int64)
    r0 = tl.load(tile_ptr + pid_m * 4 + 1)
    nr = tl.load(tile_ptr + pid_m * 4 + 2)
    p0 = tl.load(tile_ptr + pid_m * 4 + 3)
    last = p0 + nr - 1  # position of the tile's last query: no key after it is visible
    n0 = pid_n * BN
    if n0 <= last:
        offs_m = tl.arange(0, BM)
        offs_n = n0 + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        rmask = offs_m < nr
        kmask = offs_n <= last
        # -- gather the key tile through the block table --
        page = tl.load(bt_ptr + seq * stride_bt + offs_n // PS, mask=kmask, other=0).to(tl.int64)
        k_off = page * stride_kp + (offs_n % PS) * stride_ks
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
        rows = (r0 + offs_m).to(tl.int64)
        q_base = q_ptr + rows[:, None] * stride_qt + offs_d[None, :]
        # -- weighted sum over heads of relu(q_h . k) --
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for h in range(H):
            qh = tl.load(q_base + h * stride_qh, mask=rmask[:, None], other=0.0)
            wh = tl.load(wt_ptr + h * stride_wh + rows, mask=rmask, other=0.0)
            s = tl.dot(qh, tl.trans(k))
            acc += tl.maximum(s, 0.0) * wh[:, None]
        if HAS_SCALE:
            ks = tl.load(ks_ptr + page * stride_sp + offs_n % PS, mask=kmask, other=0.0)
            acc = acc * ks[None, :]
        # -- store scores; fold this tile into each row's visible maximum --
        lrow = (r0 - row0 + offs_m).to(tl.int64)
        tl.store(s_ptr + lrow[:, None] * stride_s + offs_n[None, :], acc, mask=rmask[:, None])
        visible = offs_n[None, :] <= (p0 + offs_m)[:, None]
        row_max = tl.max(tl.where(visible, acc, float("-inf")), 1)
        tl.atomic_max(mx_ptr + lrow, row_max, mask=rmask)


# grid: (cdiv(width, BN), B); each program: BN keys of one sequence against its query's heads.
@triton.jit
def _decode_logits_kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    ks_ptr,
    bt_ptr,
    len_ptr,
    s_ptr,
    mx_ptr,
    stride_qt,
    stride_qh,
    stride_wt,
    stride_kp,
    stride_ks,
    stride_sp,
    stride_bt,
    stride_s,
    H: tl.constexpr,
    BH: tl.constexpr,
    D: tl.constexpr,
    PS: tl.constexpr,
    BN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(len_ptr + b)
    n0 = pid_n * BN
    if n0 < n:
        offs_n = n0 + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        offs_h = tl.arange(0, BH)
        kmask = offs_n < n
        hmask = offs_h < H
        page = tl.load(bt_ptr + b * stride_bt + offs_n // PS, mask=kmask, other=0).to(tl.int64)
        k_off = page * stride_kp + (offs_n % PS) * stride_ks
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
        q = tl.load(
            q_ptr + b * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
            mask=hmask[:, None],
            other=0.0,
        )
        w = tl.load(w_ptr + b * stride_wt + offs_h, mask=hmask, other=0.0)
        s = tl.dot(q, tl.trans(k))  # [BH, BN]
        sc = tl.sum(tl.maximum(s, 0.0) * w[:, None], 0)
        if HAS_SCALE:
            sc = sc * tl.load(ks_ptr + page * stride_sp + offs_n % PS, mask=kmask, other=0.0)
        tl.store(s_ptr + b * stride_s + offs_n, sc, mask=kmask)
        tl.atomic_max(mx_ptr + b, tl.max(tl.where(kmask, sc, float("-inf")), 0))


def _check(q, k_cache, k_scale):
    di = q.shape[2]
    if di < 16 or di & (di - 1):
        raise ValueError(f"indexer (triton): DI must be a power of two >= 16, got {di}")
    if q.stride(2) != 1 or k_cache.stride(2) != 1:
        raise ValueError("indexer (triton): q and k_cache need a contiguous last dimension")
    if k_scale is not None and k_scale.stride(1) != 1:
        raise ValueError("indexer (triton): k_scale needs a contiguous last dimension")


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _plan_from_tensors(cu_seqlens_q, seq_lens, cfg: dict, budget: int) -> PrefillTiles:
    """The plan from device tensors: a host read-back (callers outside the engine, tests)."""
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    tiles, groups = plan_prefill(cu, lens, cfg, budget)
    dev = cu_seqlens_q.device
    t = cu[-1]
    nq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    seq_of = torch.repeat_interleave(torch.arange(len(lens), device=dev), nq, output_size=t)
    # Visible keys of every row: its position + 1.
    lengths = (
        torch.arange(t, device=dev)
        - cu_seqlens_q.long()[seq_of]
        + seq_lens.long()[seq_of]
        - nq[seq_of]
        + 1
    ).to(torch.int32)
    tile_t = torch.tensor(tiles, dtype=torch.int32, device=dev).view(-1, 4)
    return PrefillTiles(tile_t, tuple(groups), lengths, cfg)


def indexer_topk_prefill(
    q,
    weights,
    k_cache,
    k_scale,
    block_tables,
    cu_seqlens_q,
    seq_lens,
    topk: int,
    config: dict | None = None,
    score_budget: int = SCORE_BUDGET,
    select: str = "radix",
    misses: torch.Tensor | None = None,
    topk_config: dict | None = None,
    topk_cap: int | None = None,
    plan: PrefillTiles | None = None,
) -> torch.Tensor:
    """`plan`: this forward's tiles (kernels/indexer/plan.py); without one they are computed here,
    which reads the lengths back to the host. `select` (for kernels.bench): "radix" (the Triton
    top-k), "torch" (torch.topk on the same score tiles) or "none" (scores only; the output is
    left unwritten)."""
    _check(q, k_cache, k_scale)
    t = q.shape[0]
    out = torch.empty((t, topk), dtype=torch.int32, device=q.device)
    if t == 0:
        return out
    if plan is None:
        cfg = config or prefill_config(q.dtype, _interpreting(q))
        plan = _plan_from_tensors(cu_seqlens_q, seq_lens, cfg, score_budget)
    elif config is not None and config is not plan.config:
        raise ValueError("indexer (triton): pass either a config or a plan cut for one")
    cfg, groups, tile_t, lengths = plan.config, plan.groups, plan.tiles, plan.lengths
    bn = cfg["BN"]
    hi, di = q.shape[1:]
    dev = q.device
    # Scratch sized for the largest group, reused by all.
    max_rows = max(g[2] for g in groups)
    scores_flat = torch.empty(max(g[2] * g[3] for g in groups), dtype=torch.float32, device=dev)
    row_max = torch.empty(max_rows, dtype=torch.float32, device=dev)
    cand = topk_tri.scratch(max_rows, dev, topk_cap)
    wt = weights.t().contiguous()  # [HI, T]: coalesced per-head weight loads
    ks = k_scale if k_scale is not None else k_cache  # unused pointer when HAS_SCALE is False
    stride_sp = k_scale.stride(0) if k_scale is not None else 0
    for g0, g1, rows, width, row0 in groups:
        scores = scores_flat[: rows * width].view(rows, width)
        mx = row_max[:rows].fill_(float("-inf"))
        grid = (width // bn, g1 - g0)
        _prefill_logits_kernel[grid](
            q,
            wt,
            k_cache,
            ks,
            block_tables,
            tile_t[g0:g1],
            scores,
            mx,
            row0,
            q.stride(0),
            q.stride(1),
            wt.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            stride_sp,
            block_tables.stride(0),
            scores.stride(0),
            H=hi,
            D=di,
            PS=k_cache.shape[1],
            BM=cfg["BM"],
            BN=bn,
            HAS_SCALE=k_scale is not None,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        lens = lengths[row0 : row0 + rows]
        if select == "radix":
            topk_tri.launch(
                scores,
                lens,
                mx,
                out[row0 : row0 + rows],
                topk,
                cand=cand,
                misses=misses,
                config=topk_config,
            )
        elif select == "torch":
            from kernels.topk import ref as topk_ref

            out[row0 : row0 + rows] = topk_ref.topk_rows(scores, lens, topk)
    return out


def indexer_topk_decode(
    q,
    weights,
    k_cache,
    k_scale,
    block_tables,
    seq_lens,
    topk: int,
    config: dict | None = None,
    misses: torch.Tensor | None = None,
    topk_config: dict | None = None,
    select: str = "radix",
) -> torch.Tensor:
    """No host synchronisation: sizes come from tensor shapes (CUDA-graph friendly).
    `select` as in indexer_topk_prefill."""
    _check(q, k_cache, k_scale)
    cfg = config or (INTERPRET_DECODE if _interpreting(q) else DEFAULT_DECODE)
    bn = cfg["BN"]
    b, hi, di = q.shape
    out = torch.empty((b, topk), dtype=torch.int32, device=q.device)
    if b == 0:
        return out
    width = cdiv(block_tables.shape[1] * k_cache.shape[1], bn) * bn
    scores = torch.empty((b, width), dtype=torch.float32, device=q.device)
    mx = torch.full((b,), float("-inf"), dtype=torch.float32, device=q.device)
    lengths = seq_lens.to(torch.int32)
    ks = k_scale if k_scale is not None else k_cache
    weights = weights.contiguous()
    _decode_logits_kernel[(width // bn, b)](
        q,
        weights,
        k_cache,
        ks,
        block_tables,
        lengths,
        scores,
        mx,
        q.stride(0),
        q.stride(1),
        weights.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_scale.stride(0) if k_scale is not None else 0,
        block_tables.stride(0),
        scores.stride(0),
        H=hi,
        BH=max(16, next_pow2(hi)),
        D=di,
        PS=k_cache.shape[1],
        BN=bn,
        HAS_SCALE=k_scale is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if select == "none":
        return out
    return topk_tri.launch(scores, lengths, mx, out, topk, misses=misses, config=topk_config)
