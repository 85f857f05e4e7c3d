"""Comparison helpers shared by the kernel tests and the benchmark's sanity checks.

One error metric for dense outputs (RMS error relative to the reference's RMS, with the max
absolute error reported), and a set comparison for top-k indices: fp8 or bf16 scores reorder
near-ties, so exact index equality is the wrong test, while causality and padding must be exact.
"""

from __future__ import annotations

import torch

# Allowed RMS-relative error per compute dtype of the kernel under test (one table for all ops).
RATIO = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float8_e4m3fn: 1e-5,  # FP8 paths compute in fp32 on identical quantised inputs
}


def ratio_for(dtype: torch.dtype) -> float:
    return RATIO[dtype]


def rms_rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    denom = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((out - ref).pow(2).mean().sqrt() / denom).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """RMS(out - ref) / RMS(ref) <= ratio; shapes must match, NaN never passes."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    err = rms_rel_err(ref, out)
    max_abs = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= ratio, (
        f"{name}: RMS-relative error {err:.3g} > {ratio:.3g} (max abs {max_abs:.3g})"
    )


def assert_topk_close(
    ref_idx: torch.Tensor,
    out_idx: torch.Tensor,
    scores: torch.Tensor | None,
    lengths: torch.Tensor,
    min_recall: float = 0.99,
    score_tol: float = 1e-4,
) -> float:
    """Top-k rows [R, topk] (-1 padded) against the reference selection.

    Exact: every valid index is < lengths[r] (causality), no duplicates, and each row holds
    exactly min(topk, lengths[r]) valid indices followed by nothing but -1 (padding count).
    Statistical: recall of the reference set >= min_recall over all rows. With `scores`
    [R, >= max length] (the reference scores), a pick outside the reference set that ties the
    reference's weakest pick (within score_tol, relative) counts as a hit, and each row's summed
    score of the chosen keys must be within score_tol of the reference sum (relative to the
    reference picks' summed |score|): another choice among ties passes, a wrong pick does not.
    Returns the recall.
    """
    assert ref_idx.shape == out_idx.shape, (
        f"top-k shape {tuple(out_idx.shape)} != {tuple(ref_idx.shape)}"
    )
    assert out_idx.dtype == torch.int32, f"top-k dtype {out_idx.dtype} != int32"
    ref_idx, out_idx, lengths = ref_idx.cpu().long(), out_idx.cpu().long(), lengths.cpu().long()
    r, k = out_idx.shape
    want = lengths.clamp(max=k)
    valid = out_idx >= 0
    assert (out_idx >= -1).all(), "top-k: index below -1"
    assert (valid.sum(1) == want).all(), (
        f"top-k: wrong number of valid entries in rows "
        f"{torch.nonzero(valid.sum(1) != want).flatten()[:8].tolist()}"
    )
    assert (out_idx < lengths[:, None]).all(), "top-k: index at or after the query's position + 1"
    srt = out_idx.sort(1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    assert not dup.any(), (
        f"top-k: duplicate indices in rows {torch.nonzero(dup.any(1)).flatten()[:8].tolist()}"
    )
    # Recall via one-hot rows (column `width` collects the padding).
    width = int(max(lengths.max().item(), 1))
    ref_hot = torch.zeros(r, width + 1, dtype=torch.bool)
    out_hot = torch.zeros(r, width + 1, dtype=torch.bool)
    ref_hot.scatter_(1, torch.where(ref_idx >= 0, ref_idx, width), True)
    out_hot.scatter_(1, torch.where(out_idx >= 0, out_idx, width), True)
    ref_hot[:, width] = out_hot[:, width] = False
    hits = ref_hot & out_hot
    if scores is not None:
        s = torch.cat([scores.cpu().double()[:, :width], torch.zeros(r, 1, dtype=torch.double)], 1)
        # Exact ties with the reference's weakest pick are as good as the pick itself.
        kth = torch.where(ref_hot, s, float("inf")).amin(1, keepdim=True)
        tie = out_hot & ~ref_hot & (s >= kth - score_tol * kth.abs())
        per_row = torch.minimum(hits.sum(1) + tie.sum(1), ref_hot.sum(1))
    else:
        per_row = hits.sum(1)
    recall = per_row.sum().item() / max(ref_hot.sum().item(), 1)
    assert recall >= min_recall, f"top-k: recall {recall:.4f} < {min_recall}"
    if scores is not None:

        def pick(vals, idx):
            return vals.gather(1, torch.where(idx >= 0, idx, width)).sum(1)

        scale = pick(s.abs(), ref_idx).clamp_min(1e-30)
        gap = (pick(s, ref_idx) - pick(s, out_idx)) / scale
        assert (gap <= score_tol).all(), (
            f"top-k: chosen scores fall short of the reference by up to {gap.max().item():.3g} "
            f"(relative) in rows {torch.nonzero(gap > score_tol).flatten()[:8].tolist()}"
        )
    return recall


# -- input factories (tests and kernels.bench); seed torch's RNGs for repeatable draws --


def paged_tables(seq_lens: list[int], page_size: int, device=None) -> tuple[torch.Tensor, int]:
    """Block tables [B, max_pages] int32 over a shuffled pool (so logical neighbours are not
    physical neighbours) plus one spare page; returns (tables, pages in the pool)."""
    pages = [max(1, -(-n // page_size)) for n in seq_lens]
    pool = sum(pages) + 1
    perm = torch.randperm(pool).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    o = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[o : o + n]
        o += n
    return tables.to(device), pool


def cu_seqlens(n_q: list[int], device=None) -> torch.Tensor:
    cu = torch.zeros(len(n_q) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(n_q, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def query_positions(n_q: list[int], seq_lens: list[int], device=None) -> torch.Tensor:
    """Position of every packed query row: the last n_q[b] tokens of sequence b."""
    pos = [torch.arange(n - q, n) for q, n in zip(n_q, seq_lens, strict=True)]
    return torch.cat(pos).to(device)


def causal_indices(positions: torch.Tensor, topk: int) -> torch.Tensor:
    """Distinct causal indices [T, topk] int32 spread over each row's whole past (one in each of
    topk disjoint integer strata of [0, pos]), -1 padded where fewer than topk keys are visible."""
    dev = positions.device
    pos = positions.long()[:, None]
    j = torch.arange(topk, device=dev)[None, :]
    u = torch.rand(positions.shape[0], topk, device=dev)
    lo, hi = j * (pos + 1) // topk, (j + 1) * (pos + 1) // topk
    strat = lo + (u * (hi - lo)).long()
    dense = torch.where(j <= pos, j, -1)
    return torch.where(pos + 1 >= topk, strat, dense).to(torch.int32)


def indexer_inputs(
    n_q: list[int],
    seq_lens: list[int],
    heads: int,
    dim: int,
    dtype,
    device=None,
    page_size: int = 64,
) -> dict:
    """Keyword arguments of indexer_topk_prefill (minus topk). dtype float8_e4m3fn quantises q and
    k as the model does (one scale per key and per (query, head), the latter folded into the
    weights); keys are stored for the whole sequences, queries are each sequence's last tokens."""
    tables, pool = paged_tables(seq_lens, page_size, device)
    t = sum(n_q)
    q = torch.randn(t, heads, dim, device=device)
    k = torch.randn(pool, page_size, dim, device=device)
    w = torch.randn(t, heads, device=device) * (heads * dim) ** -0.5
    k_scale = None
    if dtype == torch.float8_e4m3fn:
        from kernels.fp8 import ref as fp8_ref

        q, q_scale = fp8_ref.act_quant(q, dim, True)
        k, k_scale = fp8_ref.act_quant(k, dim, True)
        w, k_scale = w * q_scale[..., 0], k_scale[..., 0].contiguous()
    else:
        q, k = q.to(dtype), k.to(dtype)
    return {
        "q": q,
        "weights": w.float().contiguous(),
        "k_cache": k,
        "k_scale": k_scale,
        "block_tables": tables,
        "cu_seqlens_q": cu_seqlens(n_q, device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
    }


def attn_inputs(
    n_q: list[int],
    seq_lens: list[int],
    heads: int,
    kv_heads: int,
    k_dim: int,
    v_dim: int,
    topk: int,
    dtype,
    device=None,
    mla: bool = False,
    page_size: int = 64,
) -> dict:
    """Keyword arguments of sparse_attn_prefill (minus scale). mla=True makes v_cache the
    leading v_dim columns of k_cache, as the model passes it."""
    tables, pool = paged_tables(seq_lens, page_size, device)
    t = sum(n_q)
    k = torch.randn(pool, page_size, kv_heads, k_dim, device=device).to(dtype)
    v = (
        k[..., :v_dim]
        if mla
        else torch.randn(pool, page_size, kv_heads, v_dim, device=device).to(dtype)
    )
    q = torch.randn(t, heads, k_dim, device=device).to(dtype)
    pos = query_positions(n_q, seq_lens, device)
    return {
        "q": q,
        "k_cache": k,
        "v_cache": v,
        "block_tables": tables,
        "cu_seqlens_q": cu_seqlens(n_q, device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "indices": causal_indices(pos, topk),
    }
