"""The whole-stack run's model, sizing, serving config and comparison (benchmarks/stack/)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from benchmarks.stack import compare, model, run


@pytest.mark.parametrize("layers", [1, 3, 6])
def test_sizing_per_layer_arithmetic_matches_the_model(layers):
    cfg = model.model_config(layers, quick=True)
    s = model.size_for(model.Workload(), 1 << 62, 0, layers=layers, quick=True)
    assert s.weight_bytes == model.weight_bytes(cfg)
    assert s.kv_bytes_per_token_all_f == model.kv_bytes_per_token(cfg, "F" * layers)


def test_glm_flash_shape_and_its_kv_row():
    cfg = model.model_config(47)
    assert (cfg["hidden_size"], cfg["n_routed_experts"], cfg["vocab_size"]) == (2048, 64, 154880)
    # MLA row 512 + 64 and an indexer key of 128, bf16, on every layer (all-F)
    assert model.kv_bytes_per_token(cfg, "F" * 47) == 47 * (576 + 128) * 2
    assert model.kv_bytes_per_token(cfg, run.pattern_for("quarter", 47)) == (
        47 * 576 * 2 + 12 * 128 * 2
    )


def test_size_for_takes_the_most_layers_that_fit_gpu_and_disk():
    # the tiny dims (quick) keep the test fast; the arithmetic is the same for the GLM shape
    work = model.Workload(doc_tokens=8192, max_tokens=256, fit=8)
    reserve, margin = 1 << 20, 1 << 20
    kw = dict(quick=True, disk_margin=margin)
    at20 = model.size_for(work, 1 << 62, reserve, layers=20, **kw)
    s = model.size_for(work, at20.gpu_needed, reserve, **kw)
    assert (s.layers, s.limited_by) == (20, "limited by GPU memory")
    assert model.size_for(work, at20.gpu_needed - 1, reserve, **kw).layers == 19
    whole = model.size_for(work, 1 << 62, reserve, **kw)
    assert (whole.layers, whole.limited_by) == (47, "the whole model fits")
    disk = at20.weight_bytes + margin
    by_disk = model.size_for(work, 1 << 62, reserve, disk_free_bytes=disk, **kw)
    assert (by_disk.layers, by_disk.limited_by) == (20, "limited by disk")
    with pytest.raises(ValueError, match="not even one layer"):
        model.size_for(work, 2 * reserve, reserve, **kw)


def test_checkpoint_loads_under_both_plans(tmp_path):
    from model.loader import load_model
    from serving.config import ServingConfig

    cfg = model.model_config(2, quick=True)
    model.write_checkpoint(cfg, tmp_path, "cpu", torch.float32)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-base.safetensors",
        "model-layer000.safetensors",
        "model-layer001.safetensors",
    }
    full = load_model(tmp_path, "FF", dtype=torch.float32)
    quarter = load_model(tmp_path, "FS", dtype=torch.float32)
    assert quarter.model.layers[1].self_attn.indexer is None
    a, b = full.state_dict(), quarter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    experts = [k for k in a if k.endswith("experts.gate_up_proj")]
    assert experts and a[experts[0]].std() > 0.01  # random, not zeros
    s = model.size_for(model.Workload(256, 32, 8), model.NO_GPU, 0, layers=2, quick=True)
    for device in ("cpu", "cuda"):
        conf = ServingConfig.model_validate(model.serving_yaml(tmp_path, s, s_work(), device, 8000))
        assert conf.mode == "disaggregated" and conf.routing.max_local_prefill_tokens == 0
        assert conf.decode.engine.kv_memory_bytes == s.decode_kv_bytes
        assert conf.decode.num_gpus == conf.prefill.num_gpus == (0.5 if device == "cuda" else 0)


def s_work():
    return model.Workload(256, 32, 8)


def test_quarter_pattern():
    assert run.pattern_for("quarter", 9) == "FSSSFSSSF"
    assert run.pattern_for("all-F", 3) == "FFF"
    with pytest.raises(ValueError, match="plan"):
        run.pattern_for("half", 4)


def test_saturated_tokens_per_s_counts_the_oversubscribed_stage_only(tmp_path):
    (tmp_path / "run.json").write_text(
        json.dumps({"load_started": 100.0, "load_stopped": 140.0, "plan": {"saturated_from_s": 20}})
    )
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t", "generation_tokens"])
        w.writeheader()
        for t in range(100, 146):  # 10 tokens/s before the stage, 50/s in it
            w.writerow({"t": t, "generation_tokens": 10 * min(t - 100, 20) + 50 * max(t - 120, 0)})
    assert compare.saturated_tokens_per_s(tmp_path) == pytest.approx(50.0)
