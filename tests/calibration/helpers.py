"""Shared builders for the calibration tests."""

from __future__ import annotations

import torch

from model import load_model


def random_ids(batch: int, seq_len: int, seed: int = 0, vocab: int = 320) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (batch, seq_len), generator=g)


@torch.no_grad()
def sample_from(model, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Ancestral samples of `model` itself: under this data the model's own plan minimises the
    expected loss (any other plan adds KL(p_model || p_plan) >= 0 per token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (batch, 1), generator=g)
    for _ in range(seq_len - 1):
        probs = torch.softmax(model(ids)[:, -1].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def dead_layer_model(path: str, dead: list[int]):
    """All-F dsa_llama where `dead` layers' attention output projection is zero, so their top-k
    choice cannot change anything. Attention and LM head are scaled up so the other layers'
    choices matter and the model is confident (its samples then punish any change)."""
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                lin.weight.mul_(3.0)
        for l in dead:
            model.model.layers[l].self_attn.o_proj.weight.zero_()
        model.lm_head.weight.mul_(20.0)
    return model
