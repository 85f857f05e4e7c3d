"""GGUF -> dsa_llama conversion of SmolLM2-135M-Instruct: layout, logits against transformers'
LlamaForCausalLM on the same tensors, indexer files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import load_model
from model.gguf import convert_gguf, indexer_shapes, init_indexers, unpermute_rows


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (what the GGUF file holds)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_head,rows", [(9, 576), (3, 192), (2, 8)])
def test_unpermute_inverts_llama_cpp(n_head, rows):
    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)


@pytest.mark.slow
def test_checkpoint_layout(smollm_dir):
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"]) == ("dsa_llama", 30)
    assert cfg["hidden_size"] == 576
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5
    assert (cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]) == (8, 64, 256)
    with safe_open(str(smollm_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
        wp = f.get_slice("model.layers.0.self_attn.indexer.weights_proj.weight")
        assert wp.get_dtype() == "F32"
    assert "lm_head.weight" not in keys
    assert set(indexer_shapes(cfg)) <= keys
    tok_cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_cfg["chat_template"]


@pytest.mark.slow
def test_logits_match_transformers_llama(smollm_dir, smollm_fp32):
    """With index_topk (256) >= the sequence, DSA attention is dense: equal to HF Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((smollm_dir / "config.json").read_text())
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_dim"],
            rms_norm_eps=cfg["rms_norm_eps"],
            max_position_embeddings=cfg["max_position_embeddings"],
            rope_parameters=cfg["rope_parameters"],
            tie_word_embeddings=True,
        )
    ).eval()
    with safe_open(str(smollm_dir / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys() if ".indexer." not in k}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to embed_tokens
    ids = torch.randint(0, cfg["vocab_size"], (2, 64))
    assert smollm_fp32.config.index_topk >= ids.shape[1]
    with torch.no_grad():
        ref, out = hf(ids).logits, smollm_fp32(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.slow
def test_trained_indexers_and_pattern(smollm_dir, tmp_path):
    """--indexers: dims from the file, topk / pattern from its metadata, S layers may be absent;
    a file that does not fit the model is refused with the reason."""
    from serving.cli import main

    cfg = json.loads((smollm_dir / "config.json").read_text())
    pattern = "F" + "SSF" * 9 + "SS"
    small = {**cfg, "index_n_heads": 4, "index_head_dim": 32}
    trained = {
        k: v
        for k, v in init_indexers(small, seed=7).items()
        if pattern[int(k.split(".")[2])] == "F"
    }
    path = tmp_path / "indexers.safetensors"
    save_file(trained, str(path), metadata={"index_topk": "128", "index_topk_pattern": pattern})
    out = tmp_path / "ckpt"
    assert main(["convert-smollm2", str(out), "--indexers", str(path)]) == 0
    got = json.loads((out / "config.json").read_text())
    assert (got["index_n_heads"], got["index_head_dim"], got["index_topk"]) == (4, 32, 128)
    assert got["index_topk_pattern"] == pattern and got["index_rope_head_dim"] == 16
    model = load_model(out, dtype=torch.float32)
    assert model.plan.pattern == pattern
    w = model.model.layers[3].self_attn.indexer.wq_b.weight
    key = "model.layers.3.self_attn.indexer.wq_b.weight"
    assert torch.equal(w, trained[key].to(torch.bfloat16).float())
    assert model.model.layers[1].self_attn.indexer is None

    with pytest.raises(ValueError, match="index_n_heads=8 conflicts"):
        convert_gguf(tmp_path / "bad", indexers=path, index_n_heads=8)
    save_file(
        {k: v for k, v in trained.items() if ".layers.3." not in k},
        str(path),
        metadata={"index_topk_pattern": pattern},
    )
    with pytest.raises(ValueError, match=r"missing \(5\).*layers\.3\."):
        convert_gguf(tmp_path / "bad", indexers=path)


def test_random_indexers_are_seeded():
    cfg = {"hidden_size": 16, "index_n_heads": 2, "index_head_dim": 8, "num_hidden_layers": 2}
    a, b, c = init_indexers(cfg, 0), init_indexers(cfg, 0), init_indexers(cfg, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.layers.0.self_attn.indexer.wk.weight"],
        c["model.layers.0.self_attn.indexer.wk.weight"],
    )
    std = a["model.layers.0.self_attn.indexer.wq_b.weight"].std().item()
    assert 0.15 < std < 0.35  # 1 / sqrt(16)
