"""The references are the spec: check them against brute-force per-query loops written straight
from the formulas (dsa.md 1.6-1.7 for the indexer; softmax over the selected keys for attention)."""

from __future__ import annotations

import torch

from kernels.indexer import ref as iref
from kernels.sparse_attn import ref as sref
from kernels.testing import attn_inputs, indexer_inputs, query_positions


def test_indexer_ref_matches_brute_force():
    n_q, lens, topk = [3, 1, 6], [9, 1, 70], 8
    inp = indexer_inputs(n_q, lens, 3, 16, torch.float8_e4m3fn, page_size=4)
    out = iref.indexer_topk_prefill(**inp, topk=topk)
    pos = query_positions(n_q, lens)
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(n_q))
    for t in range(sum(n_q)):
        b, p = int(seq[t]), int(pos[t])
        scores = []
        for s in range(p + 1):  # key s of sequence b lives in page table[b][s // 4], row s % 4
            page, row = int(inp["block_tables"][b, s // 4]), s % 4
            k = inp["k_cache"][page, row].float()
            dots = inp["q"][t].float() @ k
            weighted = (inp["weights"][t] * dots.relu()).sum()
            scores.append(float(inp["k_scale"][page, row] * weighted))
        want = sorted(range(p + 1), key=lambda s: -scores[s])[:topk]
        got = [i for i in out[t].tolist() if i >= 0]
        assert sorted(got) == sorted(want), t
        assert out[t].tolist()[len(got) :] == [-1] * (topk - len(got))


def test_sparse_attn_ref_matches_brute_force():
    n_q, lens = [2, 3], [5, 40]
    inp = attn_inputs(n_q, lens, 4, 2, 8, 6, 7, torch.float64, page_size=8)
    inp["indices"][1, 2] = -1
    out = sref.sparse_attn_prefill(**inp, scale=0.3)
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor(n_q))
    for t in range(sum(n_q)):
        b = int(seq[t])
        for h in range(4):
            kvh = h // 2  # 2 query heads per KV head
            sel = [int(i) for i in inp["indices"][t] if i >= 0]
            rows = [(int(inp["block_tables"][b, i // 8]), i % 8) for i in sel]
            k = torch.stack([inp["k_cache"][p, r, kvh] for p, r in rows])
            v = torch.stack([inp["v_cache"][p, r, kvh] for p, r in rows])
            w = torch.softmax(k @ inp["q"][t, h] * 0.3, 0)
            torch.testing.assert_close(out[t, h], w @ v)
