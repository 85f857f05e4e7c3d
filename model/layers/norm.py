from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalise in fp32, scale in the input dtype (as transformers' DeepSeek/Llama norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
