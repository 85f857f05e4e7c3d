"""Lightning indexer of one F layer: scores every earlier token and keeps the top-k (dsa.md 1).

Only F layers build this module; S layers reuse `ctx.topk` from the nearest preceding F layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.index_fp8 import quant_index_queries, store_index_keys
from kernels.indexer import indexer_topk_decode, indexer_topk_prefill
from kernels.kv_store import store_rows
from model.config import ModelConfig
from model.context import ForwardContext
from model.layers.glue import indexer_project
from model.layers.linear import weight_of


class LightningIndexer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.interleave = cfg.index_rope_head_dim, cfg.indexer_rope_interleave
        self.topk = cfg.index_topk
        q_in = cfg.q_lora_rank if cfg.is_mla else cfg.hidden_size  # GQA: the normed hidden state
        self.wq_b = nn.Linear(q_in, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        # Kept in fp32 whatever the model dtype: bf16 rounding here flips near-tied top-k choices.
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def project(self, x: torch.Tensor, q_in: torch.Tensor, ctx: ForwardContext):
        """-> q [T, HI, DI], k [T, DI] (both rotated), w [T, HI] fp32 with HI^-.5 DI^-.5 folded."""
        cos, sin = ctx.rope[self.rope_dim]
        return indexer_project(
            x,
            q_in,
            weight_of(self.wq_b),
            weight_of(self.wk),
            self.k_norm.weight,
            self.k_norm.bias,
            self.k_norm.eps,
            self.weights_proj.weight,
            cos,
            sin,
            self.n_heads,
            self.head_dim,
            self.rope_dim,
            self.interleave,
        )

    def forward(self, x: torch.Tensor, q_in: torch.Tensor, ctx: ForwardContext) -> None:
        q, k, w = self.project(x, q_in, ctx)
        cache = ctx.cache
        k_cache, k_scale = cache.index_k[self.layer_id], cache.index_scale[self.layer_id]
        if cache.layout.index_fp8:
            # Hadamard on both sides spreads outliers before e4m3 (dot products unchanged), then
            # one scale per key and per (query, head); the query scale folds into the weights.
            # One pass each: the keys straight into the cache, the queries with the weights.
            q, w = quant_index_queries(q, w)
            store_index_keys(k, k_cache, k_scale, ctx.slot_mapping)
        else:
            store_rows(k_cache, k, ctx.slot_mapping)
        if ctx.is_decode:
            ctx.topk = indexer_topk_decode(
                q, w, k_cache, k_scale, ctx.block_tables, ctx.seq_lens, self.topk
            )
        else:
            ctx.topk = indexer_topk_prefill(
                q,
                w,
                k_cache,
                k_scale,
                ctx.block_tables,
                ctx.cu_seqlens_q,
                ctx.seq_lens,
                self.topk,
                plan=ctx.indexer_plan,
            )
