"""benchmarks/saturation.py: a CPU smoke run (tiny model) and the GPU preset's KV arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.saturation import GLM_MID, PRESETS, main, quarter_pattern
from model.config import ModelConfig
from model.index_cache import IndexCacheConfig
from model.kv_cache import KVLayout
from model.tiny import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["unified", "decode"])
def test_saturation_smoke(tmp_path, mode):
    out = tmp_path / "sat.json"
    report = main(
        [
            "--mode",
            mode,
            "--context",
            "120",
            "--gen",
            "8",
            "--fit",
            "3",
            "--requests",
            "8",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert out.with_suffix(".png").stat().st_size > 0
    f, q = report["results"]["all-F"], report["results"]["1/4"]
    assert report["summary"]["index_bytes_ratio"] == 0.25
    assert q["kv_capacity_tokens"] > f["kv_capacity_tokens"]  # same bytes, more tokens
    assert f["kv_pool_bytes"] <= report["kv_budget_bytes"]
    assert q["kv_pool_bytes"] <= report["kv_budget_bytes"]
    # the all-F pool holds 3 whole requests; the 1/4 pool admits more at once
    assert f["max_concurrent_seqs"] <= 3 < q["max_concurrent_seqs"]
    per_request = 8 - (mode == "decode")  # decode mode: the first token came with the payload
    for r in (f, q):
        assert r["generated_tokens"] == 8 * per_request
        assert r["saturated_steps"] > 0 and r["decode_tok_s_saturated"] > 0
        assert r["pages_free_after"] == r["kv_blocks"]


def test_glm_mid_preset_kv_arithmetic():
    """The GPU preset (not run on CPU): GLM-5 attention rows, 8 layers, 1/4 plan = FSSSFSSS."""
    kind, overrides = PRESETS["glm-mid"][:2]
    cfg = ModelConfig.from_hf({**tiny_config(kind), **GLM_MID})
    assert overrides is GLM_MID and quarter_pattern(8) == "FSSSFSSS"
    full = KVLayout.for_model(cfg, IndexCacheConfig("F" * 8), torch.bfloat16)
    quarter = KVLayout.for_model(cfg, IndexCacheConfig(quarter_pattern(8)), torch.bfloat16)
    assert full.attn_bytes_per_token_layer == 576 * 2 and full.index_bytes_per_token_layer == 256
    assert full.bytes_per_token == 8 * (1152 + 256)
    assert quarter.bytes_per_token == 8 * 1152 + 2 * 256
    budget = 40 << 30
    assert quarter.blocks_for_budget(budget) / full.blocks_for_budget(budget) > 1.15
