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


def _checked_ids(topk_ids: torch.Tensor, e_total: int) -> torch.Tensor:
    flat = topk_ids.flatten().long()
    if bool(((flat < -1) | (flat >= e_total)).any()):
        raise ValueError(f"moe: topk_ids must lie in [0, E={e_total}) or be -1 (no local expert)")
    return flat


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
    flat_ids = _checked_ids(topk_ids, e_total)
    order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids + 1, minlength=e_total + 1).tolist()
    start = counts.pop(0)  # the -1 slots sort first and are skipped
    tokens = order // k
    xf, wf = x.float(), topk_weights.flatten().float()
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel, tok = order[start : start + n], tokens[start : start + n]
        start += n
        gate, up = F.linear(xf[tok], w_gate_up[e].float()).split(two_i // 2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e].float())
        out.index_add_(0, tok, y * wf[sel, None])
    return out.to(x.dtype)


def fused_moe_fp8(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_gate_up_scale: torch.Tensor,
    w_down: torch.Tensor,
    w_down_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    ue8m0: bool,
) -> torch.Tensor:
    """The FP8 variant (spec): the same grouping and SwiGLU as `fused_moe`, with x quantised per
    token and 128-wide block before the gate/up GEMM, each pair's intermediate rounded to x's
    dtype and quantised the same way before the down GEMM (what the kernel feeds the tensor
    cores), and the e4m3 expert weights dequantised with their 128 x 128 block scales."""
    from kernels.fp8.ref import act_quant
    from kernels.fp8_gemm.ref import BLOCK, dequant_act, dequant_weight

    t, k = topk_ids.shape
    e_total, two_i, _ = w_gate_up.shape
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if t == 0:
        return out.to(x.dtype)
    flat_ids = _checked_ids(topk_ids, e_total)
    xd = dequant_act(*act_quant(x, BLOCK, ue8m0))
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids + 1, minlength=e_total + 1).tolist()
    start = counts.pop(0)  # the -1 slots
    tokens = order // k
    wf = topk_weights.flatten().float()
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel, tok = order[start : start + n], tokens[start : start + n]
        start += n
        w_gu = dequant_weight(w_gate_up[e], w_gate_up_scale[e])
        gate, up = F.linear(xd[tok], w_gu).split(two_i // 2, dim=-1)
        h = (F.silu(gate) * up).to(x.dtype)
        hd = dequant_act(*act_quant(h, BLOCK, ue8m0))
        y = F.linear(hd, dequant_weight(w_down[e], w_down_scale[e]))
        out.index_add_(0, tok, y * wf[sel, None])
    return out.to(x.dtype)
