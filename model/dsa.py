"""The DSA causal LM: embedding, decoder layers (F layers run the indexer, S layers reuse the
nearest preceding F layer's top-k through the forward context), final norm and LM head.

Module names mirror the Hugging Face checkpoints so state dicts load by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig
from model.context import ForwardContext
from model.index_cache import IndexCacheConfig
from model.kv_cache import KVCache, KVLayout
from model.layers.attention import GQAttention, MLAttention
from model.layers.glue import add_rms_norm
from model.layers.mlp import MLP, MoE
from model.layers.norm import RMSNorm
from model.layers.rotary import Rotary
from model.parallel.group import SINGLE, Parallel
from model.parallel.layers import VocabParallelEmbedding, VocabParallelLMHead


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, runs_indexer: bool, par: Parallel):
        super().__init__()
        attn_cls = MLAttention if cfg.is_mla else GQAttention
        self.self_attn = attn_cls(cfg, layer_id, runs_indexer, par)
        if cfg.is_moe_layer(layer_id):
            self.mlp = MoE(cfg, par)
        else:
            inter = par.split(cfg.intermediate_size, "intermediate_size")[1]
            self.mlp = MLP(cfg.hidden_size, inter, par)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = self.post_attention_layernorm
        h, x = add_rms_norm(h, self.self_attn(self.input_layernorm(h), ctx), n.weight, n.eps)
        return h + self.mlp(x)


class DSAModel(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: IndexCacheConfig, par: Parallel):
        super().__init__()
        if par.size > 1:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, par)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, plan.is_full(i), par) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DSAForCausalLM(nn.Module):
    """`model(input_ids)` with ids [B, S] (or [S]) runs a one-shot forward on a scratch cache and
    returns logits [B, S, V]; the engine passes packed ids [T] with its own `ForwardContext` and
    gets logits for `ctx.logits_indices` (all rows when None).

    `par`: this rank's place in a tensor-parallel replica (model/parallel); the modules are
    built with this rank's shard shapes, and every rank returns the same full logits."""

    def __init__(
        self, cfg: ModelConfig, plan: IndexCacheConfig | None = None, par: Parallel = SINGLE
    ):
        super().__init__()
        self.config, self.par = cfg, par
        self.plan = plan or cfg.index_cache
        if self.plan.num_layers != cfg.num_hidden_layers:
            raise ValueError(
                f"IndexCache plan has {self.plan.num_layers} layers, the model has "
                f"{cfg.num_hidden_layers}"
            )
        self.model = DSAModel(cfg, self.plan, par)
        if par.size > 1:
            self.lm_head = VocabParallelLMHead(cfg.hidden_size, cfg.vocab_size, par)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotaries = {
            d: Rotary(cfg.rope, d) for d in {cfg.attn_rope_dim, cfg.index_rope_head_dim}
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def kv_layout(self, index_fp8: bool = False, dtype: torch.dtype | None = None) -> KVLayout:
        return KVLayout.for_model(self.config, self.plan, dtype or self.dtype, index_fp8)

    def prepare(self, ctx: ForwardContext) -> None:
        """Rotary tables for this step's positions, computed once and shared by all layers."""
        for dim, rot in self.rotaries.items():
            ctx.rope[dim] = rot.cos_sin(ctx.positions)

    def hidden_states(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Packed ids [T] -> final normed hidden states [T, d]."""
        self.prepare(ctx)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, ctx)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        if ctx is not None:
            h = self.hidden_states(input_ids, ctx)
            if ctx.logits_indices is not None:
                h = h[ctx.logits_indices]
            return self.lm_head(h)
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        b, s = ids.shape
        ctx = scratch_context(self, b, s)
        logits = self.lm_head(self.hidden_states(ids.reshape(-1), ctx))
        return logits.view(b, s, -1) if input_ids.dim() == 2 else logits


def scratch_context(
    model: DSAForCausalLM, batch: int, seq_len: int, index_fp8: bool = False
) -> ForwardContext:
    """A private cache holding exactly `batch` sequences of `seq_len` tokens, for cache-free use."""
    layout = model.kv_layout(index_fp8)
    pages = math.ceil(seq_len / layout.page_size)
    cache = KVCache(layout, batch * pages, model.device)
    tables = torch.arange(batch * pages, device=model.device, dtype=torch.int32).view(batch, pages)
    return ForwardContext.for_batch([seq_len] * batch, [0] * batch, tables, cache)
