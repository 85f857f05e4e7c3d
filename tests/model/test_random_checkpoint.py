"""The random FP8 checkpoint writer: the full DeepSeek-V3.2 and GLM-5 configs give the released
shapes and parameter counts (checked on meta tensors, nothing written), and a scaled-down
write loads with keep_fp8 (sharded, indexed, e4m3 where the release is) and runs."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from model import ModelConfig, load_model
from model.dsa import DSAForCausalLM
from model.layers.linear import Fp8Linear
from model.layers.mlp import Fp8Experts
from model.random_checkpoint import DEEPSEEK_V32, GLM_5, write_random_fp8
from model.save import hf_state_dict


def _meta(cfg):
    with torch.device("meta"):
        return hf_state_dict(DSAForCausalLM(ModelConfig.from_hf(cfg)))


def test_full_configs_have_the_released_shapes():
    sd = _meta(DEEPSEEK_V32)
    a = "model.layers.5.self_attn."
    want = {
        a + "indexer.wq_b.weight": (8192, 1536),
        a + "indexer.wk.weight": (128, 7168),
        a + "indexer.weights_proj.weight": (64, 7168),
        a + "q_b_proj.weight": (24576, 1536),
        a + "kv_a_proj_with_mqa.weight": (576, 7168),
        a + "kv_b_proj.weight": (32768, 512),
        a + "o_proj.weight": (7168, 16384),
        "model.layers.5.mlp.experts.255.down_proj.weight": (7168, 2048),
    }
    assert {k: tuple(sd[k].shape) for k in want} == want
    n = sum(t.numel() for t in sd.values())
    assert 660e9 < n < 680e9, n  # 671B without the MTP layer
    glm = _meta(GLM_5)
    assert tuple(glm["model.layers.3.self_attn.q_b_proj.weight"].shape) == (16384, 2048)
    assert 730e9 < sum(t.numel() for t in glm.values()) < 760e9  # 744B with MTP, ~740B without


def test_scaled_write_loads_fp8_and_runs(tmp_path):
    small = dict(
        vocab_size=512, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, v_head_dim=64, index_n_heads=4, n_routed_experts=8, n_group=2,
        topk_group=1, index_topk=16, max_position_embeddings=4096,
    )  # fmt: skip
    out = tmp_path / "ds"
    write_random_fp8(out, "deepseek_v32", num_layers=4, overrides=small)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.3.mlp.experts.7.up_proj.weight"
    with safe_open(out / index[key], "pt") as f:
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
    with safe_open(out / index[key + "_scale_inv"], "pt") as f:
        assert f.get_tensor(key + "_scale_inv").shape == (1, 2)
    m = load_model(out, dtype=torch.float32, keep_fp8=True)
    assert isinstance(m.model.layers[3].mlp.experts, Fp8Experts)
    assert isinstance(m.model.layers[0].self_attn.q_b_proj, Fp8Linear)
    with torch.no_grad():
        logits = m(torch.randint(0, 261, (1, 24)))
    assert logits.shape == (1, 24, 512) and torch.isfinite(logits).all()
