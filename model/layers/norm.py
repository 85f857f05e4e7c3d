from __future__ import annotations

import torch
from torch import nn

from model.layers.glue import rms_norm


class RMSNorm(nn.Module):
    """Normalise in fp32, scale in the input dtype (as transformers' DeepSeek/Llama norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
