"""FP8 checkpoints loaded with keep_fp8: linears and experts stay e4m3 with their block
scales and run through kernels.fp8_gemm and kernels.moe.fused_moe_fp8; kv_b_proj, the router
and linears whose K is not whole 128-blocks are dequantised; the logits stay within FP8
activation rounding of the dequantised model, and the default load is unchanged."""

from __future__ import annotations

import torch

from kernels.fp8_gemm import dequant_weight
from kernels.testing import assert_close
from model import ModelConfig, load_model
from model.dsa import DSAForCausalLM
from model.fp8_checkpoint import QUANT_CONFIG, fp8_state_dict, quantize_weight
from model.layers.linear import Fp8Linear
from model.layers.mlp import Fp8Experts
from model.save import hf_state_dict, save_checkpoint
from model.tiny import init_weights, tiny_config


def _fp8_tiny(tmp_path, **over):
    cfg = {
        **tiny_config("deepseek_v32"),
        "hidden_size": 256,
        "q_lora_rank": 256,
        "moe_intermediate_size": 128,
        "intermediate_size": 256,
        **over,
    }
    model = DSAForCausalLM(ModelConfig.from_hf(cfg))
    init_weights(model, seed=5)
    sd = fp8_state_dict(hf_state_dict(model))
    return save_checkpoint(model, {**cfg, "quantization_config": QUANT_CONFIG}, tmp_path, sd)


def test_quantize_weight_roundtrip():
    w = torch.randn(200, 300) * torch.logspace(-3, 1, 300)
    q, s = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    blocks = torch.zeros(256, 384)
    blocks[:200, :300] = w
    amax = blocks.view(2, 128, 3, 128).abs().amax((1, 3))
    bound = amax.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300] / 8
    assert ((back - w).abs() <= bound + 1e-12).all()


def test_keep_fp8_linears_and_logits(tmp_path):
    path = _fp8_tiny(tmp_path / "fp8", v_head_dim=32)  # o_proj's K = 4 heads x 32
    deq = load_model(path, dtype=torch.float32)
    fp8 = load_model(path, dtype=torch.float32, keep_fp8=True)
    assert not any(isinstance(m, Fp8Linear) for m in deq.modules())
    attn = fp8.model.layers[1].self_attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        mod = getattr(attn, name)
        assert isinstance(mod, Fp8Linear), name
        assert (
            mod.weight.dtype == torch.float8_e4m3fn and mod.weight_scale_inv.dtype == torch.float32
        )
    assert isinstance(attn.indexer.wq_b, Fp8Linear) and isinstance(attn.indexer.wk, Fp8Linear)
    assert isinstance(fp8.model.layers[0].mlp.down_proj, Fp8Linear)  # the dense first layer
    assert isinstance(fp8.model.layers[1].mlp.shared_experts.up_proj, Fp8Linear)
    ex, ex_deq = fp8.model.layers[2].mlp.experts, deq.model.layers[2].mlp.experts
    assert isinstance(ex, Fp8Experts) and ex.down_proj.dtype == torch.float8_e4m3fn
    for e in (0, 5):  # stacked gate/up scales line up with the stacked weights
        gu = dequant_weight(ex.gate_up_proj[e], ex.gate_up_proj_scale_inv[e])
        assert torch.equal(gu, ex_deq.gate_up_proj[e])
        dn = dequant_weight(ex.down_proj[e], ex.down_proj_scale_inv[e])
        assert torch.equal(dn, ex_deq.down_proj[e])
    # dequantised: absorbed into the per-head einsums, or not a linear
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert attn.indexer.weights_proj.weight.dtype == torch.float32
    # same stored weights: the FP8 module dequantises to the default load's fp32 weight
    q = attn.q_b_proj
    ref = deq.model.layers[1].self_attn.q_b_proj.weight
    assert torch.equal(dequant_weight(q.weight, q.weight_scale_inv), ref)
    # 12 tokens: fewer than index_topk, so every key is attended and no near-tied top-k pick can
    # flip; what remains is e4m3 rounding of the activations at each of ~20 linears (measured
    # 0.065; a misplaced block scale gives O(1)).
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, b = deq(ids), fp8(ids)
    assert_close("fp8 logits", a, b, 0.12)
    assert not torch.equal(a, b)  # the FP8 path really ran


def test_fp8_linear_compiles_in_glue(tmp_path):
    """The custom op keeps torch.compile(fullgraph=True) of a glue function whole."""
    from model.layers import glue

    path = _fp8_tiny(tmp_path / "fp8")
    m = load_model(path, dtype=torch.float32, keep_fp8=True)
    # o_proj's K (4 heads x v_head_dim 16) is not whole 128-blocks: dequantised
    assert type(m.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    mlp = m.model.layers[0].mlp
    x = torch.randn(5, 256)
    from model.layers.linear import weight_of

    ws = [weight_of(mlp.gate_proj), weight_of(mlp.up_proj), weight_of(mlp.down_proj)]
    compiled = torch.compile(glue.swiglu.eager, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, *ws), glue.swiglu.eager(x, *ws))
