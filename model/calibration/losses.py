"""Indexer distillation losses (DSA warm-up; IndexCache paper section 3.2, paper.md section 4).

For query t of one sequence (causal keys s <= t):
  p_t^(l)  dense attention of layer l summed over heads and L1-normalised (the DSA target)
  q_t^(l)  softmax over s of the layer-l indexer score I[t, s] = sum_h w[t, h] relu(q[t, h] . k[s])
  warm-up (single layer)   KL(p^(l) || q^(l))
  multi-layer, F layer l serving S layers l+1..l+m:
                           L_multi = 1/(m+1) sum_{j=0..m} KL(p^(l+j) || q^(l))
Proposition 1: grad L_multi = grad KL(mean_j p^(l+j) || q^(l)), since p does not depend on the
indexer. Losses here are sums over query rows; callers normalise.

Everything is computed for a chunk of query rows against all keys of the sequence, so memory is
rows x keys per chunk rather than keys^2 (`distill.py` chunks and back-propagates per chunk).
"""

from __future__ import annotations

import torch

from kernels.indexer.ref import score_rows


def causal_mask(pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[C, n_keys] True where key s is visible to the query at position pos[c] (s <= pos)."""
    return torch.arange(n_keys, device=pos.device)[None, :] <= pos[:, None]


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, pos: torch.Tensor
) -> torch.Tensor:
    """Dense causal softmax per head: q [C, H, D], keys of the sequence k [S, Hkv, D] (head h reads
    KV head h // (H / Hkv), so MLA's absorbed form is Hkv = 1) -> [C, H, S] fp32."""
    c, h, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    logits = torch.einsum("cngd,snd->cngs", q.float().view(c, hkv, h // hkv, d), k.float())
    logits = (logits * scale).reshape(c, h, n)
    logits = logits.masked_fill(~causal_mask(pos, n)[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def head_summed(probs: torch.Tensor) -> torch.Tensor:
    """[C, H, S] -> [C, S]: summed over heads and L1-normalised (each head already sums to 1)."""
    return probs.mean(dim=1)


def indexer_logits(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Indexer scores I [C, S] fp32 (the kernels' reference formula), -inf past each query:
    q [C, HI, DI], w [C, HI] (scales folded), keys of the sequence k [S, DI]."""
    ones = torch.ones(k.shape[0], device=k.device)
    scores = score_rows(q, w.float(), k.float(), ones)
    return scores.masked_fill(~causal_mask(pos, k.shape[0]), float("-inf"))


def kl_rows(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t || softmax(logits_t)) per row [C]; p is 0 on masked keys (0 log 0 = 0)."""
    keep = p > 0
    # Zero both logs where p is 0 so no 0 * inf appears, not even in a discarded branch.
    log_q = torch.where(keep, torch.log_softmax(logits, dim=-1), 0.0)
    log_p = torch.where(keep, p, 1.0).log()
    return (p * (log_p - log_q)).sum(-1)


def multi_layer_kl(ps: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """L_multi summed over rows: 1/(m+1) sum_j KL(p^(l+j) || q^(l)); ps[0] is the F layer's own
    target, a single entry gives the DSA warm-up loss."""
    if not ps:
        raise ValueError("multi_layer_kl needs at least the F layer's own target")
    return sum(kl_rows(p, logits).sum() for p in ps) / len(ps)


def averaged_kl(ps: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """L_avg summed over rows: KL(mean_j p^(l+j) || q^(l)) (Proposition 1's equivalent form)."""
    return kl_rows(torch.stack(ps).mean(0), logits).sum()
