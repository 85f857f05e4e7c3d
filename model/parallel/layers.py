"""Vocab-parallel embedding and LM head: rank r holds vocabulary rows [r V/N, (r+1) V/N)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.parallel.group import Parallel


class VocabParallelEmbedding(nn.Module):
    """Each rank looks up the ids in its rows (zeros elsewhere); the all-reduce adds one real
    row to zeros, so the result is exactly the unsharded lookup."""

    def __init__(self, vocab: int, dim: int, par: Parallel):
        super().__init__()
        self.par = par
        self.start, n = par.split(vocab, "vocab_size")
        self.weight = nn.Parameter(torch.empty(n, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.par.all_reduce(out.masked_fill_(outside[:, None], 0.0))


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary slice, gathered along the vocabulary on every rank."""

    def __init__(self, dim: int, vocab: int, par: Parallel):
        super().__init__()
        self.par = par
        self.weight = nn.Parameter(torch.empty(par.split(vocab, "vocab_size")[1], dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.par.all_gather_last(F.linear(h, self.weight))
