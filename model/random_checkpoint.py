"""`python -m model.random_checkpoint OUT [--family deepseek_v32|glm_moe_dsa] [--layers N]`:
write a random FP8 checkpoint with the released models' shapes, names and dtypes, for GPU runs
where the real weights cannot be downloaded.

DeepSeek-V3.2 (671B, ~690 GB) or GLM-5 (744B) at full size, or scaled by layers (--layers 4:
the three dense layers and one MoE layer, 17 GB for DeepSeek-V3.2, 15 GB for GLM-5).
Projection weights are e4m3 with one fp32 `weight_scale_inv` per 128 x 128 block, as
released; norms, router, indexer head weights, embedding and LM head bf16/fp32. Values:
N(0, std) after dequantisation (e4m3 codes ~ N(0, 32), scale std / 32); the text is noise.
Written tensor by tensor into ~4 GB shards with a model.safetensors.index.json; --device cuda
draws the random numbers on a GPU (the full size on one CPU core: an hour or more, estimated).
The configs are the released config.json fields (shared/reference/dsa.md section 3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.dsa import DSAForCausalLM
from model.fp8_checkpoint import BLOCK, QUANT_CONFIG, is_quantised
from model.save import hf_state_dict
from model.tiny import write_tokenizer

DEEPSEEK_V32 = {
    "model_type": "deepseek_v32",
    "architectures": ["DeepseekV32ForCausalLM"],
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "quantization_config": {**QUANT_CONFIG, "scale_fmt": "ue8m0"},
}
GLM_5 = {
    "model_type": "glm_moe_dsa",
    "architectures": ["GlmMoeDsaForCausalLM"],
    "vocab_size": 154880,
    "hidden_size": 6144,
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 78,
    "first_k_dense_replace": 3,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 2048,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "index_n_heads": 32,
    "index_head_dim": 128,
    "index_topk": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 202752,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "rope_interleave": True,
    "indexer_rope_interleave": True,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "quantization_config": QUANT_CONFIG,
}
FAMILIES = {"deepseek_v32": DEEPSEEK_V32, "glm_moe_dsa": GLM_5}
SHARD_BYTES = 4 << 30
FP32 = ("norm.weight", "norm.bias", "layernorm.weight", "e_score_correction_bias")


def _tensors(meta: dict, std: float, gen: torch.Generator, device):
    """(name, tensor) of the checkpoint, one at a time (never the whole model in memory)."""
    for name, t in meta.items():
        shape = tuple(t.shape)
        if is_quantised(name, t):
            codes = torch.randn(shape, generator=gen, device=device).mul_(32).clamp_(-448, 448)
            yield name, codes.to(torch.float8_e4m3fn).cpu()
            nb, kb = -(-shape[0] // BLOCK), -(-shape[1] // BLOCK)
            yield name + "_scale_inv", torch.full((nb, kb), std / 32, dtype=torch.float32)
        elif name.endswith(("norm.weight", "layernorm.weight")):
            yield name, torch.ones(shape, dtype=torch.float32)
        elif name.endswith(FP32):
            yield name, torch.zeros(shape, dtype=torch.float32)
        else:
            w = torch.randn(shape, generator=gen, device=device).mul_(std)
            yield name, w.to(torch.bfloat16).cpu()


def write_random_fp8(
    out: str | Path,
    family: str = "deepseek_v32",
    num_layers: int | None = None,
    overrides: dict | None = None,
    seed: int = 0,
    std: float = 0.02,
    device: str = "cpu",
) -> Path:
    """Write config.json, FP8 safetensors shards, their index and a byte-level tokenizer."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    cfg = {**FAMILIES[family], **(overrides or {})}
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg["num_hidden_layers"] = num_layers
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = DSAForCausalLM(ModelConfig.from_hf(cfg))
    meta = hf_state_dict(model)  # meta tensors: names and shapes only
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            files.append((fname, list(shard)))
        shard, size = {}, 0

    for name, t in _tensors(meta, std, gen, device):
        if size + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
    flush()
    weight_map = {k: f for f, keys in files for k in keys}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"random": True}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_tokenizer(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.random_checkpoint", description=__doc__)
    ap.add_argument("out", help="output directory")
    ap.add_argument("--family", default="deepseek_v32", choices=sorted(FAMILIES))
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: full)")
    ap.add_argument("--device", default="cpu", help="where random numbers are drawn (cuda: fast)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = write_random_fp8(a.out, a.family, a.layers, seed=a.seed, device=a.device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
