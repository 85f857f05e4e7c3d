"""Tiny transformers configs used as the independent reference (transformers' own DSA models)."""

from __future__ import annotations

import torch

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
YARN_UNEVEN = {**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0}

_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    index_topk=8,
    index_head_dim=16,
    index_n_heads=16,
)

# name -> (family, overrides). Every case keeps index_topk well below the test length (>= 4x).
# At least 12 indexer heads: a key scores exactly 0 when every head's ReLU is off (probability
# 2^-heads with random weights), and exact ties are broken by position here but in
# implementation-defined order by torch.topk in transformers.
CASES = {
    "dsv32-yarn-groups2": ("deepseek_v32", dict(rope_parameters=YARN)),
    "dsv32-default-heads8": (
        "deepseek_v32",
        dict(
            num_attention_heads=8,
            num_key_value_heads=8,
            index_n_heads=24,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=2,
        ),
    ),
    "dsv32-yarn-mscale-uneven": (
        "deepseek_v32",
        dict(rope_parameters=YARN_UNEVEN, index_topk=12, qk_rope_head_dim=16, index_head_dim=32),
    ),
    "glm-default": ("glm_moe_dsa", dict()),
    "glm-heads2-dense2": (
        "glm_moe_dsa",
        dict(
            num_attention_heads=2,
            first_k_dense_replace=2,
            n_group=4,
            topk_group=2,
            index_n_heads=12,
        ),
    ),
    "glm-yarn-topk12": ("glm_moe_dsa", dict(rope_parameters=YARN, index_topk=12, v_head_dim=24)),
    # IndexCache plans through transformers' own config fields
    "glm-freq2": ("glm_moe_dsa", dict(num_hidden_layers=6, index_topk_freq=2)),
    "glm-freq3": ("glm_moe_dsa", dict(num_hidden_layers=7, index_topk_freq=3)),
    "glm-pattern": ("glm_moe_dsa", dict(num_hidden_layers=6, index_topk_pattern="FSFSSF")),
    "glm-freq2-offset1": (
        "glm_moe_dsa",
        dict(num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=1),
    ),
}


def build_hf(family: str, overrides: dict, seed: int = 0):
    from transformers import (
        DeepseekV32Config,
        DeepseekV32ForCausalLM,
        GlmMoeDsaConfig,
        GlmMoeDsaForCausalLM,
    )

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
        "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM),
    }[family]
    model = model_cls(cfg_cls(**{**_BASE, **overrides})).eval()
    with torch.no_grad():  # non-zero correction bias so group-limited routing is exercised
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    return model
