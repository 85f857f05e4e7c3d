"""Cross-layer top-k overlap (IndexCache paper Appendix A): for layers i, j the mean over query
tokens of |T_i ∩ T_j| / index_topk, all layers running their own indexer.

Only queries with more than index_topk visible keys count: before that every key is selected and
the overlap is 1 by construction, which would hide the structure (the paper measures at 200K).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from model.calibration.evaluate import PlanEvaluator
from model.dsa import DSAForCausalLM


def pair_overlap(a_sorted: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row |A ∩ B| for index sets [R, k] with no repeats; `a_sorted` sorted along rows."""
    at = torch.searchsorted(a_sorted, b).clamp_(max=a_sorted.shape[1] - 1)
    return (a_sorted.gather(1, at) == b).sum(-1)


@torch.no_grad()
def topk_overlap(model: DSAForCausalLM, batches: list[torch.Tensor], progress: bool = True) -> dict:
    """-> {"overlap": N x N mean overlap, "adjacent_mean", "rows", ...} on all-F `model`."""
    ev = PlanEvaluator(model, batches)
    n, k = ev.num_layers, model.config.index_topk
    sums = torch.zeros(n, n, dtype=torch.float64)
    rows = 0
    for ids in tqdm(ev.batches, desc="top-k overlap", unit="batch", disable=not progress):
        ctx = ev.context(ids)
        ctx.topk, ctx.skip_indexer = None, frozenset()
        sparse = ctx.positions >= k  # more than k visible keys: a real choice was made
        if not bool(sparse.any()):
            continue
        h = model.model.embed_tokens(ids.reshape(-1))
        sets = []
        for layer in model.model.layers:
            h = layer(h, ctx)
            sets.append(ctx.topk[sparse].sort(-1).values)
        for i in range(n):
            for j in range(i, n):
                c = float(pair_overlap(sets[i], sets[j]).sum())
                sums[i, j] += c
                sums[j, i] += c if j != i else 0
        rows += int(sparse.sum())
    if rows == 0:
        raise ValueError(f"overlap: no query has more than index_topk={k} keys; use seq_len > {k}")
    mean = (sums / (rows * k)).tolist()
    adjacent = [mean[i][i + 1] for i in range(n - 1)]
    return {
        "num_layers": n,
        "index_topk": k,
        "rows": rows,
        "overlap": mean,
        "adjacent": adjacent,
        "adjacent_mean": sum(adjacent) / len(adjacent) if adjacent else None,
    }
