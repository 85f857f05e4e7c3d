"""Logits of `load_model` match transformers' DeepseekV32 / GlmMoeDsa forward (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from tests.model.hf_configs import CASES, build_hf

SEQ = 48  # >= 4 x index_topk in every case, so the top-k really drops keys


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    hf = build_hf(family, overrides)
    assert hf.config.index_topk * 4 <= SEQ
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.plan.indexer_types == list(
        getattr(hf.config, "indexer_types", None) or ["full"] * hf.config.num_hidden_layers
    )
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert rel_err(out, ref) < 1e-4


def test_sparsity_is_active():
    """Guard against a vacuous comparison: dropping the top-k (dense attention) changes logits."""
    family, overrides = CASES["glm-default"]
    hf = build_hf(family, overrides)
    ids = torch.randint(0, 256, (1, SEQ))
    with torch.no_grad():
        sparse = hf(ids).logits
        hf.config.index_topk = SEQ
        for layer in hf.model.layers:
            layer.self_attn.indexer.index_topk = SEQ
        dense = hf(ids).logits
    assert rel_err(sparse, dense) > 1e-3
