"""Distillation losses: the dense target is the layer's real attention, KL basics, Proposition 1."""

from __future__ import annotations

import pytest
import torch

from model import load_model, scratch_context
from model.calibration.losses import (
    attention_probs,
    averaged_kl,
    head_summed,
    indexer_logits,
    kl_rows,
    multi_layer_kl,
)
from model.tiny import KINDS
from tests.calibration.helpers import random_ids


def layer_inputs(model, ids):
    """Normed attention input of every layer for one forward, and the context."""
    ctx = scratch_context(model, *ids.shape)
    model.prepare(ctx)
    xs = []
    with torch.no_grad():
        h = model.model.embed_tokens(ids.reshape(-1))
        for layer in model.model.layers:
            xs.append(layer.input_layernorm(h))
            h = layer(h, ctx)
    return xs, ctx


@pytest.mark.parametrize("kind", KINDS)
def test_dense_target_is_the_layers_attention(tiny_dir, kind):
    """With index_topk >= seq_len the layer attends densely, so per-head probabilities from
    `qkv` must reproduce the attention module's own output."""
    model = load_model(tiny_dir(kind), dtype=torch.float32)  # index_topk 16
    ids = random_ids(1, 12, seed=4)
    xs, ctx = layer_inputs(model, ids)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        want = attn(xs[1], ctx)
        _, q, k, v = attn.qkv(xs[1], ctx)
        probs = attention_probs(q, k, attn.scale, ctx.positions)  # [T, H, S]
        g = q.shape[1] // k.shape[1]
        o = torch.einsum("chs,shv->chv", probs, v.float().repeat_interleave(g, dim=1))
        got = attn.output(o.to(q.dtype))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    p = head_summed(probs)
    torch.testing.assert_close(p.sum(-1), torch.ones(12))
    assert bool((p.triu(1) == 0).all())  # causal


def test_kl_rows_basics():
    pos = torch.arange(6)
    logits = torch.randn(6, 6).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    q = torch.softmax(logits, -1)
    torch.testing.assert_close(kl_rows(q, logits), torch.zeros(6), atol=1e-6, rtol=0)
    p = torch.softmax(torch.randn(6, 6).masked_fill(logits.isinf(), float("-inf")), -1)
    logits.requires_grad_(True)
    kl = kl_rows(p, logits)
    assert bool((kl[1:] > 0).all()) and kl[0].abs() < 1e-6  # row 0 has one key: always 0
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert pos.shape == (6,)


def test_proposition_1_gradients_match(tiny_dir):
    """grad L_multi == grad KL(mean p || q) w.r.t. the F layer's indexer (paper Eq. 3), while the
    loss values differ by the targets' entropy gap, so the check is not vacuous."""
    model = load_model(tiny_dir("glm_moe_dsa", index_topk=4), dtype=torch.float32)
    with torch.no_grad():  # sharper, more layer-specific attention than the random init's
        for layer in model.model.layers:
            layer.self_attn.q_b_proj.weight.mul_(4.0)
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(4.0)
    ids = random_ids(1, 24, seed=5)
    xs, ctx = layer_inputs(model, ids)
    layers, l, served = model.model.layers, 1, [1, 2, 3]
    pos = ctx.positions
    with torch.no_grad():
        ps = []
        for j in served:
            _, q, k, _ = layers[j].self_attn.qkv(xs[j], ctx)
            ps.append(head_summed(attention_probs(q, k, layers[j].self_attn.scale, pos)))
        qr = layers[l].self_attn.qkv(xs[l], ctx)[0]
    indexer = layers[l].self_attn.indexer
    params = list(indexer.parameters())

    def grads(loss_fn):
        iq, ik, iw = indexer.project(xs[l], qr, ctx)
        loss = loss_fn(ps, indexer_logits(iq, iw, ik, pos))
        return loss, torch.autograd.grad(loss, params)

    l_multi, g_multi = grads(multi_layer_kl)
    l_avg, g_avg = grads(averaged_kl)

    # L_multi - L_avg = sum_t H(mean_j p_j) - mean_j H(p_j): positive, and independent of theta.
    def entropy(p):
        return -(p * torch.where(p > 0, p, 1.0).log()).sum()

    gap = entropy(torch.stack(ps).mean(0)) - sum(entropy(p) for p in ps) / len(ps)
    assert float(gap) > 1e-3
    torch.testing.assert_close(l_multi.detach() - l_avg.detach(), gap, rtol=1e-3, atol=1e-5)
    for a, b in zip(g_multi, g_avg, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # Sanity: a single-layer loss has a different gradient (the cross-layer term matters).
    _, g_single = grads(lambda ps_, lg: multi_layer_kl(ps_[:1], lg))
    assert max(float((a - b).abs().max()) for a, b in zip(g_single, g_multi, strict=True)) > 1e-5
