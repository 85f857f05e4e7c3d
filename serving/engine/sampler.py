"""Token sampling for a batch of rows with per-request parameters.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k and top-p on the sorted
distribution, then draw with the Gumbel-max trick (argmax of p / Exp(1) noise), with the noise
drawn from the request's own generator, so a seed reproduces its tokens whatever else shares the
batch. Logprobs come from the model's raw distribution (before temperature and filtering).
"""

from __future__ import annotations

import torch

from serving.engine.outputs import Logprob
from serving.engine.params import SamplingParams


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] fp32; top_k [B] int (V = off); top_p [B] fp32. Masked entries become -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64)."""
    logits = logits.float()
    out = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    vocab = logits.shape[-1]
    dev = logits.device
    sub = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
    top_k = torch.tensor(
        [params[i].top_k if params[i].top_k > 0 else vocab for i in rows], device=dev
    )
    top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
    if (top_k < vocab).any() or (top_p < 1).any():
        sub = filter_top_k_top_p(sub, top_k, top_p)
    probs = sub.softmax(-1)
    noise = torch.stack(
        [torch.empty(vocab, device=dev).exponential_(generator=generators[i]) for i in rows]
    )
    out[rows] = (probs / noise).argmax(-1)
    return out


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[Logprob]:
    """Raw log-softmax of each row: the chosen token's logprob and the top-k[row] alternatives."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    kmax = max(ks)
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax else (None, None)
    out = []
    for b, (tok, k) in enumerate(zip(tokens.tolist(), ks, strict=True)):
        top = tuple(zip(top_i[b, :k].tolist(), top_v[b, :k].tolist(), strict=True)) if k else ()
        out.append(Logprob(int(tok), float(chosen[b]), top))
    return out
