"""Reference indexer: readable, fp32, memory linear in context length (query rows in chunks)."""

from __future__ import annotations

import torch

# Query rows scored at once: bounds the fp32 score tile at CHUNK x L.
CHUNK = 256


def gather_keys(k_cache, k_scale, block_table, n: int):
    """Keys 0..n-1 of one sequence from the paged cache -> (k [n, DI] fp32, scale [n] fp32)."""
    ps = k_cache.shape[1]
    pos = torch.arange(n, device=k_cache.device)
    pages = block_table[pos // ps].long()
    k = k_cache[pages, pos % ps].float()
    s = k_scale[pages, pos % ps].float() if k_scale is not None else torch.ones(n, device=k.device)
    return k, s


def score_rows(q, w, k, k_scale):
    """I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h] . k[s]) for every pair: [C, n] fp32."""
    dots = torch.einsum("chd,sd->chs", q.float(), k).relu_()
    return torch.einsum("chs,ch->cs", dots, w) * k_scale


def select(scores, pos, topk: int):
    """Top-k of each row among columns <= pos[row]; -1 padding where fewer are visible.

    Ties go to the lower position (stable sort). torch.topk's tie order depends on the row
    length, so without this a chunked prefill (shorter rows) and a one-shot prefill could keep
    different keys when scores tie, e.g. at exactly 0 when every head's ReLU is off.
    """
    n = scores.shape[1]
    cols = torch.arange(n, device=scores.device)
    scores = scores.masked_fill(cols[None, :] > pos[:, None], float("-inf"))
    idx = scores.sort(dim=-1, descending=True, stable=True).indices[:, : min(topk, n)]
    idx = torch.where(idx <= pos[:, None], idx, -1)  # masked columns only win when < topk visible
    out = torch.full((scores.shape[0], topk), -1, dtype=torch.int32, device=scores.device)
    out[:, : idx.shape[1]] = idx.to(torch.int32)
    return out


def indexer_topk_prefill(q, weights, k_cache, k_scale, block_tables, cu_seqlens_q, seq_lens, topk):
    out = torch.empty((q.shape[0], topk), dtype=torch.int32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        k, s = gather_keys(k_cache, k_scale, block_tables[b], n)
        first = n - (hi - lo)
        for c in range(lo, hi, CHUNK):
            e = min(c + CHUNK, hi)
            pos = torch.arange(first + c - lo, first + e - lo, device=q.device)
            out[c:e] = select(score_rows(q[c:e], weights[c:e], k, s), pos, topk)
    return out


def indexer_topk_decode(q, weights, k_cache, k_scale, block_tables, seq_lens, topk):
    b = seq_lens.shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    return indexer_topk_prefill(q, weights, k_cache, k_scale, block_tables, cu, seq_lens, topk)
