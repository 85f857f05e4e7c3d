"""Routed-expert MoE (SwiGLU experts), fused: no host sync, CUDA-graph capturable.

For each token t and slot j of its top-k, with e = topk_ids[t, j]:

    out[t] = sum_j topk_weights[t, j] * W_down[e] @ (silu(W_gate[e] @ x[t]) * (W_up[e] @ x[t]))

Shapes: T tokens, d hidden, E experts, I expert intermediate size, k slots per token.
  x             [T, d]      bf16 / fp16 / fp32
  w_gate_up     [E, 2I, d]  x's dtype; rows 0..I-1 are W_gate, rows I..2I-1 W_up
                            (the layout of model.layers.mlp.Experts.gate_up_proj)
  w_down        [E, d, I]   x's dtype
  topk_weights  [T, k]      fp32
  topk_ids      [T, k]      int32 / int64, values in [0, E), or -1: a slot for no local expert
                            (expert parallelism: another rank's), which contributes nothing.
                            Other values: the reference raises; the Triton path cannot check
                            without a host sync and drops such slots
Output: [T, d] in x's dtype. The Triton path's output and scratch shapes depend on T, k, E and
the weight shapes only, never on the routing.

`fused_moe_fp8` is the same op over FP8 experts as the DeepSeek-V3.2 / GLM-5 checkpoints ship
them: w_gate_up and w_down in float8_e4m3fn, each with fp32 scales per 128 x 128 block,
  w_gate_up_scale  [E, 2I/128, d/128]
  w_down_scale     [E, d/128, I/128]
(d and I whole 128-blocks), and x (bf16/fp16/fp32) quantised per token and 128-wide block
before each GEMM (`ue8m0`: power-of-two activation scales, DeepSeek-V3.2's scale_fmt).
"""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.moe import ref

__all__ = ["fused_moe", "fused_moe_fp8"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _validate(x, w_gate_up, w_down, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"moe: x must be [T, d] bf16/fp16/fp32, got {tuple(x.shape)} {x.dtype}")
    t, d = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != d or w_gate_up.shape[1] % 2:
        raise ValueError(f"moe: w_gate_up must be [E, 2I, d={d}], got {tuple(w_gate_up.shape)}")
    e, two_i, _ = w_gate_up.shape
    if e < 1 or two_i < 2:
        raise ValueError(f"moe: w_gate_up needs E >= 1 and I >= 1, got {tuple(w_gate_up.shape)}")
    if w_down.shape != (e, d, two_i // 2):
        raise ValueError(
            f"moe: w_down must be [E={e}, d={d}, I={two_i // 2}], got {tuple(w_down.shape)}"
        )
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"moe: {name} must have x's dtype {x.dtype}, got {w.dtype}")
    _validate_routing(x, w_gate_up, w_down, topk_weights, topk_ids)


def _validate_routing(x, w_gate_up, w_down, topk_weights, topk_ids) -> None:
    t = x.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.shape[1] < 1:
        raise ValueError(f"moe: topk_ids must be [T={t}, k>=1], got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(
            f"moe: topk_weights must be fp32 {tuple(topk_ids.shape)} (topk_ids' shape), got "
            f"{tuple(topk_weights.shape)} {topk_weights.dtype}"
        )
    for name, a in (
        ("w_gate_up", w_gate_up),
        ("w_down", w_down),
        ("topk_weights", topk_weights),
        ("topk_ids", topk_ids),
    ):
        if a.device != x.device:
            raise ValueError(f"moe: {name} is on {a.device}, x on {x.device}")


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """See the module docstring."""
    _validate(x, w_gate_up, w_down, topk_weights, topk_ids)
    if resolve_impl(impl, x.device) == "triton":
        from kernels.moe import triton as tri

        return tri.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)
    return ref.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)


def _validate_fp8(x, w_gate_up, gu_scale, w_down, d_scale) -> None:
    from kernels.fp8_gemm import BLOCK

    if x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(
            f"moe fp8: x must be [T, d] bf16/fp16/fp32, got {tuple(x.shape)} {x.dtype}"
        )
    d = x.shape[1]
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != d or w_gate_up.shape[1] % 2:
        raise ValueError(f"moe fp8: w_gate_up must be [E, 2I, d={d}], got {tuple(w_gate_up.shape)}")
    e, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    if d % BLOCK or inter % BLOCK or inter == 0:
        raise ValueError(f"moe fp8: d={d} and I={inter} must be positive multiples of {BLOCK}")
    if w_down.shape != (e, d, inter):
        raise ValueError(
            f"moe fp8: w_down must be [E={e}, d={d}, I={inter}], got {tuple(w_down.shape)}"
        )
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"moe fp8: {name} must be float8_e4m3fn, got {w.dtype}")
    for name, s, want in (
        ("w_gate_up_scale", gu_scale, (e, two_i // BLOCK, d // BLOCK)),
        ("w_down_scale", d_scale, (e, d // BLOCK, inter // BLOCK)),
    ):
        if tuple(s.shape) != want or s.dtype != torch.float32:
            raise ValueError(
                f"moe fp8: {name} must be fp32 {list(want)}, got {list(s.shape)} {s.dtype}"
            )
        if s.device != x.device:
            raise ValueError(f"moe fp8: {name} is on {s.device}, x on {x.device}")


def fused_moe_fp8(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_gate_up_scale: torch.Tensor,
    w_down: torch.Tensor,
    w_down_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    ue8m0: bool = True,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """See the module docstring."""
    _validate_fp8(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale)
    _validate_routing(x, w_gate_up, w_down, topk_weights, topk_ids)
    args = (x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, topk_weights, topk_ids, ue8m0)
    if resolve_impl(impl, x.device) == "triton":
        from kernels.moe import triton_fp8 as tri

        return tri.fused_moe_fp8(*args)
    return ref.fused_moe_fp8(*args)
