"""Block-scaled FP8 GEMM for the dense linears of FP8 checkpoints (DeepSeek's recipe).

    fp8_gemm(a, a_scale, b, b_scale, out_dtype) -> C [M, N]
      a        [M, K]                 float8_e4m3fn  activations, K a multiple of 128
      a_scale  [M, K / 128]           fp32           one scale per token and 128-wide K block
      b        [N, K]                 float8_e4m3fn  the weight as stored (out x in), any N
      b_scale  [ceil(N/128), K/128]   fp32           the checkpoint's `weight_scale_inv`
    C = dequant(a) @ dequant(b).T, fp32 accumulation, cast to out_dtype (kernels/fp8_gemm/ref.py).

    fp8_linear(x, w, w_scale, bias=None, ue8m0=True) -> y [..., N] in x's dtype
      quantises x per token and 128-wide block (kernels.fp8.act_quant), then fp8_gemm.

Both run in fixed shapes with no host sync (CUDA-graph safe). M may be 0.
"""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_impl
from kernels.fp8 import act_quant
from kernels.fp8_gemm import ref
from kernels.fp8_gemm.ref import BLOCK, dequant_weight

__all__ = ["BLOCK", "dequant_weight", "fp8_gemm", "fp8_linear"]

_OUT = (torch.bfloat16, torch.float16, torch.float32)
_E4M3 = torch.float8_e4m3fn


def _validate(a, a_scale, b, b_scale, out_dtype) -> None:
    if a.dim() != 2 or a.dtype != _E4M3:
        raise ValueError(
            f"fp8_gemm: a must be [M, K] float8_e4m3fn, got {tuple(a.shape)} {a.dtype}"
        )
    m, k = a.shape
    if k % BLOCK or k == 0:
        raise ValueError(f"fp8_gemm: K={k} must be a positive multiple of {BLOCK}")
    if b.dim() != 2 or b.dtype != _E4M3 or b.shape[1] != k or b.shape[0] < 1:
        raise ValueError(
            f"fp8_gemm: b must be [N, K={k}] float8_e4m3fn, got {tuple(b.shape)} {b.dtype}"
        )
    n = b.shape[0]
    want_a, want_b = (m, k // BLOCK), (-(-n // BLOCK), k // BLOCK)
    if tuple(a_scale.shape) != want_a or a_scale.dtype != torch.float32:
        raise ValueError(
            f"fp8_gemm: a_scale must be fp32 {list(want_a)}, got "
            f"{list(a_scale.shape)} {a_scale.dtype}"
        )
    if tuple(b_scale.shape) != want_b or b_scale.dtype != torch.float32:
        raise ValueError(
            f"fp8_gemm: b_scale must be fp32 {list(want_b)}, got "
            f"{list(b_scale.shape)} {b_scale.dtype}"
        )
    if out_dtype not in _OUT:
        raise ValueError(f"fp8_gemm: out_dtype must be one of {_OUT}, got {out_dtype}")
    for name, t in (("a_scale", a_scale), ("b", b), ("b_scale", b_scale)):
        if t.device != a.device:
            raise ValueError(f"fp8_gemm: {name} is on {t.device}, a on {a.device}")


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """See the module docstring."""
    if not torch.compiler.is_compiling():
        _validate(a, a_scale, b, b_scale, out_dtype)
    if resolve_impl(impl, a.device) == "triton":
        from kernels.fp8_gemm import triton as tri

        return tri.fp8_gemm(a, a_scale, b, b_scale, out_dtype)
    return ref.fp8_gemm(a, a_scale, b, b_scale, out_dtype)


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    ue8m0: bool = True,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ dequant(w).T (+ bias) -> [..., N] in x's dtype.
    `ue8m0` rounds the activation scales up to powers of two (DeepSeek-V3.2's scale_fmt)."""
    if x.dtype not in _OUT:
        raise ValueError(f"fp8_linear: x must be bf16/fp16/fp32, got {x.dtype}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"fp8_linear: x's last dim {x.shape[-1]} != w's K {w.shape[-1]}")
    lead = x.shape[:-1]
    xq, xs = act_quant(x.reshape(-1, x.shape[-1]), BLOCK, ue8m0, impl=impl)
    y = fp8_gemm(xq, xs, w, w_scale, x.dtype, impl=impl)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, w.shape[0])
