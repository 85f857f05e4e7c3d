"""Reference block-scaled FP8 GEMM (the spec): dequantise both operands, multiply in fp32.

    C[m, n] = sum_k (A[m, k] * a_scale[m, k // 128]) * (B[n, k] * b_scale[n // 128, k // 128])

A holds e4m3 activations with one scale per token and 128-wide K block (DeepSeek's per-token
1 x 128 `act_quant`), B the e4m3 weight [N, K] with one scale per 128 x 128 block, as the
DeepSeek-V3 / V3.2 and GLM-5 FP8 checkpoints ship it (`weight_scale_inv`: a multiplier, despite
the name). Written as the dequantise-then-matmul it is, not as the kernel's block loop."""

from __future__ import annotations

import torch

BLOCK = 128  # the checkpoints' weight_block_size and the activation block


def dequant_weight(b: torch.Tensor, b_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """[N, K] e4m3 and [ceil(N/block), ceil(K/block)] scales -> [N, K] fp32."""
    n, k = b.shape
    s = b_scale.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return b.float() * s


def dequant_act(a: torch.Tensor, a_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """[M, K] e4m3 and [M, K/block] scales -> [M, K] fp32."""
    return a.float() * a_scale.float().repeat_interleave(block, 1)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return (dequant_act(a, a_scale) @ dequant_weight(b, b_scale).T).to(out_dtype)
