"""Tiny random checkpoints with a byte-level tokenizer and a chat template, built locally.

They make text prompts work end to end in tests and in `make serve` without any download. Weights
are random, so output text is noise; shapes and code paths are the real ones (MoE with several
groups, a dense first layer, sparsity active once a prompt exceeds index_topk tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from model.config import ModelConfig
from model.dsa import DSAForCausalLM
from model.save import save_checkpoint

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KINDS = ("deepseek_v32", "glm_moe_dsa", "dsa_llama")

_MLA_MOE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
    index_topk=16,
    index_head_dim=32,
    index_n_heads=4,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=4,
    attention_bias=False,
)


def tiny_config(kind: str) -> dict:
    """A Hugging Face config.json dict for a tiny model of the given family."""
    if kind == "deepseek_v32":
        return {
            **_MLA_MOE,
            "model_type": "deepseek_v32",
            "architectures": ["DeepseekV32ForCausalLM"],
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        }
    if kind == "glm_moe_dsa":
        return {
            **_MLA_MOE,
            "model_type": "glm_moe_dsa",
            "architectures": ["GlmMoeDsaForCausalLM"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rope_interleave": True,
            "indexer_rope_interleave": True,
            "index_topk_freq": 1,
            "index_skip_topk_offset": 2,
        }
    if kind == "dsa_llama":
        return dict(
            model_type="dsa_llama",
            architectures=["DsaLlamaForCausalLM"],
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e5},
            tie_word_embeddings=True,
            index_n_heads=4,
            index_head_dim=32,
            index_rope_head_dim=16,
            index_topk=16,
            bos_token_id=0,
            eos_token_id=4,
        )
    raise ValueError(f"unknown tiny kind {kind!r}; choose from {', '.join(KINDS)}")


def init_weights(model: DSAForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: 256 byte tokens after the special tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # a set: unordered across runs
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer(out: Path, eos: str = "<|end|>") -> None:
    byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": CHAT_TEMPLATE, "eos_token": eos, "bos_token": "<|endoftext|>"},
            indent=2,
        )
    )


def make_tiny(kind: str, out: str | Path, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and a tokenizer for a tiny random model to `out`."""
    cfg = {**tiny_config(kind), **overrides}
    model = DSAForCausalLM(ModelConfig.from_hf(cfg))
    init_weights(model, seed)
    out = save_checkpoint(model, cfg, out)
    write_tokenizer(out)
    return out
