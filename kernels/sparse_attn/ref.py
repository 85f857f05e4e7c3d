"""Reference sparse attention: gather the selected rows, fp32 softmax, weighted sum."""

from __future__ import annotations

import torch

# Gathered keys per step stay near 2^24 elements whatever topk and head dims are.
BUDGET = 1 << 24
DENSE_RATIO = 64


def attend_rows(q, k_cache, v_cache, block_table, indices, scale):
    """q [C, H, Dk], indices [C, topk] into one sequence -> [C, H, Dv] (fp32)."""
    ps, hkv = k_cache.shape[1], k_cache.shape[2]
    c, h, dk = q.shape
    valid = indices >= 0
    pos = indices.clamp(min=0).long()
    pages = block_table[pos // ps].long()
    k = k_cache[pages, pos % ps].float()  # [C, topk, Hkv, Dk]
    v = v_cache[pages, pos % ps].float()  # [C, topk, Hkv, Dv]
    qg = q.float().view(c, hkv, h // hkv, dk)  # head h reads KV head h // G
    logits = torch.einsum("cngd,ctnd->cngt", qg, k) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-invalid row -> zeros, not NaN
    return torch.einsum("cngt,ctnv->cngv", p, v).reshape(c, h, -1)


def attend_masked(q, k, v, indices, scale):
    """attend_rows computed densely: q [C, H, Dk] against all n keys k [n, Hkv, Dk] / v of one
    sequence, keys outside each row's (distinct) indices masked out. Same result; on CPU a matmul
    over n keys is much faster than gathering topk rows per query once topk nears n."""
    c, h, dk = q.shape
    n, hkv = k.shape[0], k.shape[1]
    allowed = torch.zeros(c, n + 1, dtype=torch.bool, device=q.device)  # column n: -1 padding
    allowed.scatter_(1, torch.where(indices >= 0, indices, n).long(), True)
    qg = q.float().view(c, hkv, h // hkv, dk)
    logits = torch.einsum("cngd,tnd->cngt", qg, k) * scale
    logits = logits.masked_fill(~allowed[:, None, None, :n], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("cngt,tnv->cngv", p, v).reshape(c, h, -1)


def sparse_attn_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, indices, scale):
    out = torch.empty((*q.shape[:2], v_cache.shape[3]), dtype=q.dtype, device=q.device)
    h, (hkv, dk), dv, topk = q.shape[1], k_cache.shape[2:], v_cache.shape[3], indices.shape[1]
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        if cu[b + 1] == cu[b]:
            continue
        # Gathering costs ~topk * Hkv rows per query, the masked matmul ~n * H products; per-row
        # gathers are so much slower than matmuls that the dense form wins well past topk = n.
        if n * h <= DENSE_RATIO * topk * hkv:
            pos = torch.arange(n, device=q.device)
            pages = block_tables[b, pos // k_cache.shape[1]].long()
            k = k_cache[pages, pos % k_cache.shape[1]].float()
            v = v_cache[pages, pos % k_cache.shape[1]].float()
            chunk = max(1, BUDGET // (n * h))
            for s in range(cu[b], cu[b + 1], chunk):
                e = min(s + chunk, cu[b + 1])
                out[s:e] = attend_masked(q[s:e], k, v, indices[s:e], scale).to(q.dtype)
            continue
        chunk = max(1, BUDGET // (topk * (dk + dv) * hkv))
        for s in range(cu[b], cu[b + 1], chunk):
            e = min(s + chunk, cu[b + 1])
            out[s:e] = attend_rows(
                q[s:e], k_cache, v_cache, block_tables[b], indices[s:e], scale
            ).to(q.dtype)
    return out


def sparse_attn_decode(q, k_cache, v_cache, block_tables, seq_lens, indices, scale):
    b = seq_lens.shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    return sparse_attn_prefill(q, k_cache, v_cache, block_tables, cu, seq_lens, indices, scale)
