"""DSA attention: MLA in absorbed form (deepseek_v32, glm_moe_dsa) and grouped-query attention
(dsa_llama), both attending only to the keys in `ctx.topk`."""

from __future__ import annotations

import torch
from torch import nn

from kernels.kv_store import store_rows
from kernels.sparse_attn import sparse_attn_decode, sparse_attn_prefill
from model.config import ModelConfig
from model.context import ForwardContext
from model.layers.glue import mla_out, mla_qkv
from model.layers.indexer import LightningIndexer
from model.layers.linear import weight_of
from model.layers.norm import RMSNorm
from model.layers.rotary import apply_rotary
from model.parallel.group import SINGLE, Parallel

# The latent norms use a fixed 1e-6, not rms_norm_eps: DeepSeek's reference and transformers do so
# (vLLM passes rms_norm_eps, which differs only for GLM's 1e-5 and can flip near-tied top-k picks).
LATENT_NORM_EPS = 1e-6


def _attend(q, k_cache, v_cache, ctx: ForwardContext, scale: float) -> torch.Tensor:
    if ctx.is_decode:
        return sparse_attn_decode(
            q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, ctx.topk, scale
        )
    return sparse_attn_prefill(
        q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.seq_lens, ctx.topk, scale
    )


class MLAttention(nn.Module):
    """Multi-head latent attention computed in MQA ("absorbed") form: the cache holds one 576-d row
    per token [latent c (512) | rope key (64)], queries are mapped into latent space with W_UK and
    outputs back with W_UV (dsa.md 2.2).

    Under tensor parallelism this rank holds H / N heads (q_b_proj, kv_b_proj by head rows,
    o_proj by head columns) and all-reduces o_proj's partial sums; q_a_proj, kv_a_proj and the
    latent cache are per token, not per head, so they are the same on every rank."""

    def __init__(self, cfg: ModelConfig, layer_id: int, runs_indexer: bool, par: Parallel = SINGLE):
        super().__init__()
        self.layer_id, self.par = layer_id, par
        self.n_heads = par.split(cfg.num_attention_heads, "num_attention_heads")[1]
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank, self.interleave, self.scale = (
            cfg.kv_lora_rank,
            cfg.rope_interleave,
            cfg.softmax_scale,
        )
        h, d, bias = self.n_heads, cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * (self.dn + self.dr), bias=False)
        else:
            self.q_proj = nn.Linear(d, h * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, d, bias=bias)
        # S layers build no indexer at all: no parameters, no cache rows.
        self.indexer = LightningIndexer(cfg, layer_id) if runs_indexer else None

    def qkv(self, x: torch.Tensor, ctx: ForwardContext):
        """-> (qr [T, q_lora] indexer query input, q [T, H, C+R] in latent space, k [T, 1, C+R]
        cache rows, v [T, 1, C] a view of k): what the attention kernel sees."""
        cos, sin = ctx.rope[self.dr]
        lora = hasattr(self, "q_a_proj")
        qr, q, k = mla_qkv(
            x,
            weight_of(self.q_a_proj) if lora else None,
            self.q_a_proj.bias if lora else None,
            self.q_a_layernorm.weight if lora else None,
            weight_of(self.q_b_proj if lora else self.q_proj),
            weight_of(self.kv_a_proj_with_mqa),
            self.kv_a_proj_with_mqa.bias,
            self.kv_a_layernorm.weight,
            self.kv_b_proj.weight,
            cos,
            sin,
            self.n_heads,
            self.dn,
            self.dr,
            self.dv,
            self.rank,
            LATENT_NORM_EPS,
            self.interleave,
        )
        return qr, q, k, k[..., : self.rank]

    def output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [T, H, C] -> [T, d] (this rank's heads' share,
        summed over ranks; the bias once, after the sum)."""
        if self.par.size == 1:
            return mla_out(
                o_lat, self.kv_b_proj.weight, weight_of(self.o_proj), self.o_proj.bias, self.dn
            )
        out = self.par.all_reduce(
            mla_out(o_lat, self.kv_b_proj.weight, weight_of(self.o_proj), None, self.dn)
        )
        return out if self.o_proj.bias is None else out + self.o_proj.bias

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qr, q, k, _ = self.qkv(x, ctx)
        k_cache, v_cache = ctx.cache.k[self.layer_id], ctx.cache.v[self.layer_id]
        store_rows(k_cache, k, ctx.slot_mapping)
        if self.indexer is not None and self.layer_id not in ctx.skip_indexer:
            self.indexer(x, qr, ctx)
        return self.output(_attend(q, k_cache, v_cache, ctx, self.scale))


class GQAttention(nn.Module):
    """Llama-style grouped-query attention with a lightning indexer on the normed hidden state."""

    def __init__(self, cfg: ModelConfig, layer_id: int, runs_indexer: bool, par: Parallel = SINGLE):
        super().__init__()
        if par.size > 1:
            raise ValueError("tensor parallelism supports the MLA families, not dsa_llama")
        self.layer_id = layer_id
        self.n_heads, self.n_kv, self.hd = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.scale = cfg.softmax_scale
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=bias)
        self.indexer = LightningIndexer(cfg, layer_id) if runs_indexer else None

    def qkv(self, x: torch.Tensor, ctx: ForwardContext):
        """-> (indexer query input [T, d], q [T, H, D], k [T, Hkv, D], v [T, Hkv, D])."""
        t = x.shape[0]
        cos, sin = ctx.rope[self.hd]  # HF Llama layout: NeoX halves
        q = apply_rotary(self.q_proj(x).view(t, self.n_heads, self.hd), cos, sin, False)
        k = apply_rotary(self.k_proj(x).view(t, self.n_kv, self.hd), cos, sin, False)
        return x, q, k, self.v_proj(x).view(t, self.n_kv, self.hd)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o.reshape(o.shape[0], self.n_heads * self.hd))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qr, q, k, v = self.qkv(x, ctx)
        k_cache, v_cache = ctx.cache.k[self.layer_id], ctx.cache.v[self.layer_id]
        store_rows(k_cache, k, ctx.slot_mapping)
        store_rows(v_cache, v, ctx.slot_mapping)
        if self.indexer is not None and self.layer_id not in ctx.skip_indexer:
            self.indexer(x, qr, ctx)
        return self.output(_attend(q, k_cache, v_cache, ctx, self.scale))
