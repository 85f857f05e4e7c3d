"""The reference indexer breaks exact score ties by position, so a chunked prefill (shorter rows)
selects the same keys as a one-shot prefill. Real ties happen: a key scores exactly 0 whenever every
head's ReLU is off."""

from __future__ import annotations

import torch

from kernels.indexer import indexer_topk_prefill


def test_ties_prefer_lower_positions_and_ignore_chunking():
    n, topk, hi, di, ps = 40, 6, 2, 8, 16
    k = -torch.rand(n, di) - 0.1  # q.k < 0 for every head: ReLU off, score exactly 0 ...
    k[[5, 17, 30]] *= -1  # ... except three keys, fewer than topk: the cut falls inside the tie
    q = torch.ones(n, hi, di)
    w = torch.ones(n, hi)
    pages = (n + ps - 1) // ps
    cache = torch.zeros(pages, ps, di)
    cache.view(-1, di)[:n] = k
    table = torch.arange(pages, dtype=torch.int32)[None]
    full = indexer_topk_prefill(
        q,
        w,
        cache,
        None,
        table,
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32),
        topk,
        impl="ref",
    )
    # the same queries, scored as a prefix-cached chunk of the last 13 tokens
    tail = indexer_topk_prefill(
        q[-13:],
        w[-13:],
        cache,
        None,
        table,
        torch.tensor([0, 13], dtype=torch.int32),
        torch.tensor([n], dtype=torch.int32),
        topk,
        impl="ref",
    )
    assert torch.equal(full[-13:], tail)
    # among the tied zero-score keys, the selected ones are the lowest positions
    scores = torch.einsum("thd,sd->ths", q, k).relu().sum(1)
    row = n - 1
    chosen = set(full[row].tolist())
    zero_keys = [s for s in range(n) if scores[row, s] == 0]
    picked_zero = sorted(chosen & set(zero_keys))
    assert picked_zero == zero_keys[: len(picked_zero)]
    assert len(picked_zero) > 0  # the boundary really fell inside the tie
