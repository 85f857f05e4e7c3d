"""Model configuration parsed from a Hugging Face config.json.

Families:
  deepseek_v32  DeepSeek-V3.2: MLA + lightning indexer (NeoX RoPE in the indexer) + MoE
  glm_moe_dsa   GLM-5 family: same blocks, interleaved indexer RoPE, IndexCache fields
  dsa_llama     a Llama-style grouped-query model with lightning indexers added (our DSA-adapted
                small models); the indexer reads the layer's normed hidden state (no q_lora)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.index_cache import IndexCacheConfig

FAMILIES = ("deepseek_v32", "glm_moe_dsa", "dsa_llama")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> RopeConfig:
        # transformers 5 writes `rope_parameters`; released checkpoints carry rope_theta and
        # rope_scaling.
        params = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        if kind not in ("default", "yarn"):
            raise ValueError(f"rope type {kind!r} is not supported (default, yarn)")
        if kind == "default":
            return cls(theta=float(theta))
        factor = params.get("factor")
        orig = params["original_max_position_embeddings"]
        if factor is None:
            factor = cfg["max_position_embeddings"] / orig
        return cls(
            theta=float(theta),
            kind="yarn",
            factor=float(factor),
            original_max_position_embeddings=int(orig),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )

    @staticmethod
    def _mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """YaRN's attention factor, multiplied into cos/sin (1 for default RoPE)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return self._mscale(self.factor, self.mscale) / self._mscale(
                self.factor, self.mscale_all_dim
            )
        return self._mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """Extra factor on the softmax scale (DeepSeek YaRN: mscale(factor, all_dim)^2)."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        return self._mscale(self.factor, self.mscale_all_dim) ** 2


@dataclass(frozen=True, slots=True)
class Fp8Quant:
    block: tuple[int, int] = (128, 128)
    # "ue8m0": activation scales rounded up to powers of two (DeepSeek-V3.1+ scale_fmt)
    scale_fmt: str | None = None

    @property
    def ue8m0(self) -> bool:
        return self.scale_fmt == "ue8m0"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # MLA (deepseek_v32, glm_moe_dsa)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # grouped-query attention (dsa_llama)
    head_dim: int = 0
    # lightning indexer
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 2048
    index_rope_head_dim: int = 0
    indexer_rope_interleave: bool = False
    # MoE
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    mlp_layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    index_cache: IndexCacheConfig = field(default=None)  # the checkpoint's own plan
    quantization: Fp8Quant | None = None

    # -- derived --------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type != "dsa_llama"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def softmax_scale(self) -> float:
        """MLA: the original qk head dim (not 576), times YaRN's mscale^2 (dsa.md 2.2)."""
        return self.qk_head_dim**-0.5 * (self.rope.softmax_mscale if self.is_mla else 1.0)

    @property
    def attn_rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "sparse"

    # -- parsing --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        mt = cfg.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"unknown model_type {mt!r}; supported: {', '.join(FAMILIES)}")
        n = int(cfg["num_hidden_layers"])
        common = dict(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=n,
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg["max_position_embeddings"],
            rope=RopeConfig.from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            index_n_heads=cfg["index_n_heads"],
            index_head_dim=cfg["index_head_dim"],
            index_topk=cfg["index_topk"],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=_as_tuple(cfg.get("eos_token_id")),
            index_cache=IndexCacheConfig.from_hf(cfg, n),
            quantization=_parse_quant(cfg.get("quantization_config")),
        )
        if mt == "dsa_llama":
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
            return cls(
                **common,
                head_dim=head_dim,
                index_rope_head_dim=cfg.get("index_rope_head_dim", cfg["index_head_dim"] // 2),
                indexer_rope_interleave=bool(cfg.get("indexer_rope_interleave", False)),
                mlp_layer_types=("dense",) * n,
            )
        first_dense = cfg.get("first_k_dense_replace", 0)
        mlp_types = cfg.get("mlp_layer_types") or (
            ["dense"] * min(first_dense, n) + ["sparse"] * max(n - first_dense, 0)
        )
        if cfg.get("n_routed_experts") in (None, 0):
            mlp_types = ["dense"] * n
        # transformers' GLM indexer always rotates interleaved pairs; DeepSeek-V3.2's uses NeoX
        # halves. An explicit `indexer_rope_interleave` in the config wins (vLLM reads this key).
        default_interleave = mt == "glm_moe_dsa"
        return cls(
            **common,
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            index_rope_head_dim=cfg["qk_rope_head_dim"],
            indexer_rope_interleave=bool(cfg.get("indexer_rope_interleave", default_interleave)),
            n_routed_experts=cfg.get("n_routed_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            mlp_layer_types=tuple(mlp_types),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_hf(json.loads(p.read_text()))


def _as_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list | tuple) else (int(v),)


def _parse_quant(q: dict | None) -> Fp8Quant | None:
    if not q:
        return None
    if q.get("quant_method") != "fp8":
        raise ValueError(
            f"quantization_config.quant_method {q.get('quant_method')!r} is not "
            "supported (fp8 with block scales)"
        )
    block = tuple(q.get("weight_block_size") or (128, 128))
    return Fp8Quant(block=(int(block[0]), int(block[1])), scale_fmt=q.get("scale_fmt"))
