"""Reference sparse attention: gather the selected rows, fp32 softmax, weighted sum."""

from __future__ import annotations

import torch

# Gathered keys per step stay near 2^24 elements whatever topk and head dims are.
BUDGET = 1 << 24


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


def sparse_attn_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, indices, scale):
    out = torch.empty((*q.shape[:2], v_cache.shape[3]), dtype=q.dtype, device=q.device)
    chunk = max(1, BUDGET // (indices.shape[1] * (k_cache.shape[3] + v_cache.shape[3])
                              * k_cache.shape[2]))
    cu = cu_seqlens_q.tolist()
    for b in range(seq_lens.shape[0]):
        for s in range(cu[b], cu[b + 1], chunk):
            e = min(s + chunk, cu[b + 1])
            out[s:e] = attend_rows(q[s:e], k_cache, v_cache, block_tables[b], indices[s:e],
                                   scale).to(q.dtype)
    return out


def sparse_attn_decode(q, k_cache, v_cache, block_tables, seq_lens, indices, scale):
    b = seq_lens.shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    return sparse_attn_prefill(q, k_cache, v_cache, block_tables, cu, seq_lens, indices, scale)
