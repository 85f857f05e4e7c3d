"""Loader behaviour on real safetensors checkpoints: plans, FP8, sharding, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, load_model
from model.dsa import DSAForCausalLM
from model.tiny import init_weights, tiny_config


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("kind", ["glm_moe_dsa", "dsa_llama"])
def test_shared_layers_hold_no_indexer(kind, tiny_dir):
    path = tiny_dir(kind)
    full = load_model(path, dtype=torch.float32)
    shared = load_model(path, index_cache="FSSF", dtype=torch.float32)
    per_indexer = sum(p.numel() for p in full.model.layers[1].self_attn.indexer.parameters())
    assert per_indexer > 0
    assert _count(full) - _count(shared) == 2 * per_indexer
    for i in (1, 2):
        assert shared.model.layers[i].self_attn.indexer is None
        assert not any(".indexer." in n for n, _ in shared.model.layers[i].named_parameters())
    layout = shared.kv_layout()
    assert layout.index_layers == (0, 3)


def test_plan_on_all_full_checkpoint_changes_logits(tiny_dir):
    path = tiny_dir("glm_moe_dsa")
    ids = torch.randint(0, 300, (1, 80))  # 5x index_topk
    with torch.no_grad():
        a = load_model(path, dtype=torch.float32)(ids)
        b = load_model(path, index_cache="FSSS", dtype=torch.float32)(ids)
    assert not torch.allclose(a, b)


def test_shared_layer_reuses_previous_full_indices(tiny_dir):
    """With plan FSFS, layer 1 attends exactly where layer 0 chose: recompute layer 1 with layer 0's
    indices by hand through the kernels and compare hidden states."""
    path = tiny_dir("dsa_llama")
    m = load_model(path, index_cache="FSFS", dtype=torch.float32)
    seen = {}

    def hook(layer_id):
        def fn(mod, args):
            seen[layer_id] = None if args[1].topk is None else args[1].topk.clone()

        return fn

    for i, layer in enumerate(m.model.layers):
        layer.register_forward_pre_hook(hook(i))
    with torch.no_grad():
        m(torch.randint(0, 300, (1, 70)))
    # indices entering layer 2 (before its own indexer runs) are layer 0's, reused by layer 1
    assert seen[1] is not None and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3])  # layer 2 (F) chose its own


def test_fp8_checkpoint_matches_dequantised(tmp_path):
    """A config with FP8 block scales loads to the same model as its dequantised bf16 weights."""
    cfg = {**tiny_config("deepseek_v32"), "hidden_size": 256, "q_lora_rank": 160}
    model = DSAForCausalLM(ModelConfig.from_hf(cfg))
    init_weights(model, seed=3)
    from model.save import hf_state_dict, save_checkpoint

    sd = hf_state_dict(model)
    fp8, deq = {}, {}
    for k, w in sd.items():
        quantise = (
            k.endswith("proj.weight")
            and w.dim() == 2
            and "weights_proj" not in k
            and "experts" not in k
        )
        if not quantise:
            fp8[k] = deq[k] = w.to(torch.bfloat16)
            continue
        m, n = w.shape
        bm = bn = 128
        pad = torch.zeros(-(-m // bm) * bm, -(-n // bn) * bn)
        pad[:m, :n] = w
        blocks = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-8) / 448.0
        q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
        fp8[k] = q.view_as(pad)[:m, :n].contiguous()
        fp8[k + "_scale_inv"] = scale
        deq[k] = (q.float() * scale[:, None, :, None]).view_as(pad)[:m, :n].to(torch.bfloat16)
    qcfg = {
        **cfg,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
        },
    }
    save_checkpoint(model, qcfg, tmp_path / "fp8", tensors=fp8)
    save_checkpoint(model, cfg, tmp_path / "bf16", tensors=deq)
    assert any(
        t.dtype == torch.float8_e4m3fn
        for t in load_file(tmp_path / "fp8/model.safetensors").values()
    )
    a = load_model(tmp_path / "fp8", dtype=torch.bfloat16)
    b = load_model(tmp_path / "bf16", dtype=torch.bfloat16)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_sharded_checkpoint_and_mtp_layer(tiny_dir, tmp_path):
    src = tiny_dir("deepseek_v32")
    sd = load_file(f"{src}/model.safetensors")
    sd["model.layers.4.eh_proj.weight"] = torch.zeros(4, 4)  # an MTP layer past num_hidden_layers
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    shutil.copy(f"{src}/config.json", tmp_path / "config.json")
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert torch.equal(
            load_model(tmp_path, dtype=torch.float32)(ids),
            load_model(src, dtype=torch.float32)(ids),
        )


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    sd = load_file(f"{dst}/model.safetensors")
    fn(sd)
    save_file(sd, f"{dst}/model.safetensors")
    return dst


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda sd: sd.pop("model.layers.2.self_attn.kv_b_proj.weight"),
            r"missing \(1\): model.layers.2.self_attn.kv_b_proj.weight",
        ),
        (
            lambda sd: sd.__setitem__("model.layers.0.self_attn.surprise", torch.zeros(3)),
            r"unexpected \(1\): model.layers.0.self_attn.surprise",
        ),
        (
            lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7)),
            r"wrong shape \(1\): model.norm.weight: checkpoint \[7\], model \[64\]",
        ),
        (
            lambda sd: sd.pop("model.layers.3.mlp.experts.5.up_proj.weight"),
            r"missing \(1\): model.layers.3.mlp.experts.gate_up_proj \(15 of 16",
        ),
    ],
)
def test_bad_checkpoints_list_the_names(tiny_dir, tmp_path, edit, match):
    path = _edit(tiny_dir("glm_moe_dsa"), tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        load_model(path, dtype=torch.float32)


def test_plan_needing_absent_indexer_weights_is_refused(tiny_dir, tmp_path):
    """A GLM-5.2-style checkpoint ships no indexer for S layers: making such a layer F must fail."""
    src = tiny_dir("glm_moe_dsa", index_topk_freq=2)  # layers F F S F: layer 2 has no indexer
    assert load_model(src, dtype=torch.float32).plan.pattern == "FFSF"
    path = _edit(src, tmp_path / "s", lambda sd: None)
    with pytest.raises(ValueError, match=r"missing \(5\): model.layers.2.self_attn.indexer"):
        load_model(path, index_cache="FFFF", dtype=torch.float32)


def test_unknown_model_type_and_missing_files(tiny_dir, tmp_path):
    path = _edit(tiny_dir("dsa_llama"), tmp_path / "u", lambda sd: None)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen9"}))
    with pytest.raises(ValueError, match="unknown model_type 'qwen9'"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "nowhere")
