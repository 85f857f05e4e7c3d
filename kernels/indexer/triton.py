"""Lightning-indexer scores + top-k in Triton (spec: kernels/indexer/__init__.py).

Prefill: two stages per block of query rows, so memory stays bounded at any context length:
  1. a logits kernel writes fp32 scores of the rows' visible keys into a scratch buffer (rows x
     width <= SCORE_BUDGET bytes);
  2. the row top-k of kernels/topk picks each row's top-k.
Prefill logits, grid (key tiles, query tiles), key tiles fastest so that the programs running at
one time share a query tile (q is re-read per head from L2, the smaller key tile stays put):
    acc[BM, BN] = sum_h w[rows, h] * relu(q[rows, h, :] @ k[keys, :]^T)      (x k_scale if FP8)
Decode: kernels/indexer/decode.py (scores and a per-part filter fused, no padded score rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.indexer.decode import (  # noqa: F401  (re-exported: kernels.bench and tests use them)
    DECODE_CONFIGS,
    DEFAULT_DECODE,
    INTERPRET_DECODE,
    indexer_topk_decode,
)
from kernels.indexer.decode import check as _check
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
        lrow = (r0 - row0 + offs_m).to(tl.int64)
        tl.store(s_ptr + lrow[:, None] * stride_s + offs_n[None, :], acc, mask=rmask[:, None])


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
    cap = topk_cap or topk_tri.cap_for(max(g[3] for g in groups), topk)
    cand = topk_tri.scratch(max_rows, dev, cap)
    wt = weights.t().contiguous()  # [HI, T]: coalesced per-head weight loads
    ks = k_scale if k_scale is not None else k_cache  # unused pointer when HAS_SCALE is False
    stride_sp = k_scale.stride(0) if k_scale is not None else 0
    for g0, g1, rows, width, row0 in groups:
        scores = scores_flat[: rows * width].view(rows, width)
        grid = (width // bn, g1 - g0)
        _prefill_logits_kernel[grid](
            q,
            wt,
            k_cache,
            ks,
            block_tables,
            tile_t[g0:g1],
            scores,
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
