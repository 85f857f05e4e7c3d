"""Tensor and expert parallelism on CPU: gloo ranks in separate processes load their shards of
tiny checkpoints of both MLA families and must produce the single-process logits (fp32,
1e-5), with and without expert parallelism, under the checkpoint's plan and an IndexCache plan
with S layers, prompts long enough (40 > index_topk 16) that sparse selection is active."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.parallel.spawn import run_ranks

PLANS = (None, "FSSF")


def _check_logits(par, cases):
    from model import load_model
    from model.layers.mlp import Experts

    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 40))
    for path in cases:
        for plan in PLANS:
            ref = load_model(path, plan, torch.float32)
            with torch.no_grad():
                want = ref(ids)
            for ep in (False, True):
                p = dataclasses.replace(par, expert_parallel=ep)
                m = load_model(path, plan, torch.float32, parallel=p)
                experts = m.model.layers[1].mlp.experts
                assert isinstance(experts, Experts)
                e_local = experts.gate_up_proj.shape[0]
                assert e_local == (8 // par.size if ep else 8), (ep, e_local)
                assert m.model.layers[1].self_attn.n_heads == 4 // par.size
                with torch.no_grad():
                    got = m(ids)
                err = (got - want).abs().max().item() / want.abs().max().item()
                assert err <= 1e-5, f"rank {par.rank} {path} plan={plan} ep={ep}: {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4], ids=["tp2", "tp4"])
def test_tp_logits_equal_single_process(size, tiny_dir):
    cases = [tiny_dir("glm_moe_dsa"), tiny_dir("deepseek_v32")]
    run_ranks(size, _check_logits, cases, timeout_s=150)


def _fp8_checkpoint(out):
    """A DeepSeek-V3.2-shaped FP8 checkpoint small enough for CPU whose TP=2 shards are whole
    128-blocks where weights stay FP8 (q_b_proj rows, o_proj columns, MLP and expert slices)."""
    from model.random_checkpoint import write_random_fp8

    small = dict(
        vocab_size=512, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=16,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, index_topk=16,
        first_k_dense_replace=1, max_position_embeddings=4096,
    )  # fmt: skip
    return str(write_random_fp8(out, "deepseek_v32", num_layers=3, overrides=small, std=0.05))


def _check_fp8(par, path):
    from model import load_model
    from model.layers.linear import Fp8Linear
    from model.layers.mlp import Fp8Experts

    torch.manual_seed(0)
    ids = torch.randint(0, 261, (1, 40))
    with torch.no_grad():
        want = load_model(path, "FSF", torch.float32, keep_fp8=True)(ids)
    for ep in (False, True):
        p = dataclasses.replace(par, expert_parallel=ep)
        m = load_model(path, "FSF", torch.float32, keep_fp8=True, parallel=p)
        attn = m.model.layers[1].self_attn
        assert isinstance(attn.q_b_proj, Fp8Linear) and isinstance(attn.o_proj, Fp8Linear)
        assert attn.o_proj.weight_scale_inv.shape == (2, 1)  # this rank's column block
        assert isinstance(m.model.layers[1].mlp.experts, Fp8Experts)
        with torch.no_grad():
            got = m(ids)
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err <= 1e-5, f"rank {par.rank} fp8 ep={ep}: {err:.3g}"


@pytest.mark.slow
def test_tp2_fp8_weights_equal_single_process(tmp_path):
    """FP8 weights kept in e4m3 and split with their block scales: TP=2 (with and without EP)
    gives the single-process FP8 model's logits."""
    run_ranks(2, _check_fp8, _fp8_checkpoint(tmp_path / "fp8"), timeout_s=150)
