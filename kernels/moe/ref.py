"""Reference MoE experts (the spec): group the (token, slot) pairs by expert, run each expert's
SwiGLU on its tokens, scale by the routing weight and add into the token's row.

Everything is computed in fp32 and cast to x's dtype once at the end. For fp32 inputs this is,
operation for operation, the loop `model.layers.mlp.Experts` ran before the fused op existed
(stable sort by expert, one F.linear pair per expert, index_add_ in sorted order), so CPU results
did not move. The per-expert loop reads the counts on the host: fine for a reference, and the
reason the Triton version exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    t, k = topk_ids.shape
    e_total, two_i, _ = w_gate_up.shape
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    flat_ids = topk_ids.flatten().long()
    if bool(((flat_ids < 0) | (flat_ids >= e_total)).any()):
        raise ValueError(f"moe: topk_ids must lie in [0, E={e_total})")
    order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=e_total).tolist()
    tokens = order // k
    xf, wf = x.float(), topk_weights.flatten().float()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel, tok = order[start : start + n], tokens[start : start + n]
        start += n
        gate, up = F.linear(xf[tok], w_gate_up[e].float()).split(two_i // 2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e].float())
        out.index_add_(0, tok, y * wf[sel, None])
    return out.to(x.dtype)
