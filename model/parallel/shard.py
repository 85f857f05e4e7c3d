"""Which part of each checkpoint tensor a rank reads: the loader reads only that slice from the
safetensors file (`safe_open(...).get_slice(key)[slices]`), never the whole tensor.

Rules, by the parameter a tensor fills (H heads, Hl = H / N per rank; I intermediate sizes):
  rows by head        self_attn.q_b_proj / q_proj (Hl x (dn + dr) rows), kv_b_proj (Hl x (dn + dv))
  columns by head     self_attn.o_proj (Hl x dv input columns; partial sums all-reduced)
  rows / columns      mlp and shared_experts gate_proj, up_proj (rows) and down_proj (columns)
  vocab rows          model.embed_tokens, lm_head
  experts, no EP      each expert's gate/up rows and down columns, I / N of them
  experts, EP         whole experts e with e // (E / N) == rank; the others are not read at all
  replicated          everything else: q_a_proj, kv_a_proj_with_mqa, norms, the router, the
                      indexer (model/parallel/__init__.py says why)
FP8 block scales follow their weight: a kept-FP8 weight's slice must start and end on 128-row /
column blocks (the scale tensor is sliced by block); a dequantised one reads the scale rows that
cover its slice.
"""

from __future__ import annotations

import dataclasses
import re

from model.config import ModelConfig
from model.parallel.group import Parallel
from model.sources import Source

_HEAD_ROWS = re.compile(r"\.self_attn\.(q_b_proj|q_proj|kv_b_proj)\.weight$")
_HEAD_COLS = re.compile(r"\.self_attn\.o_proj\.weight$")
_MLP_ROWS = re.compile(r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$")
_MLP_COLS = re.compile(r"\.mlp\.(shared_experts\.)?down_proj\.weight$")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _cut(src: Source, dim: int, start: int, length: int) -> Source:
    sl = [slice(0, n) for n in src.shape]
    sl[dim] = slice(start, start + length)
    shape = list(src.shape)
    shape[dim] = length
    return dataclasses.replace(src, slices=tuple(sl), shape=tuple(shape))


class ShardPlan:
    """This rank's slices of a model's checkpoint under `par` (MLA families only)."""

    def __init__(self, cfg: ModelConfig, par: Parallel):
        if par.size > 1 and not cfg.is_mla:
            raise ValueError(
                f"tensor_parallel_size={par.size}: tensor parallelism supports the MLA families "
                f"(deepseek_v32, glm_moe_dsa), not {cfg.model_type}"
            )
        self.cfg, self.par = cfg, par
        if par.size == 1:
            return
        h0, self.hl = par.split(cfg.num_attention_heads, "num_attention_heads")
        self.v0, self.vl = par.split(cfg.vocab_size, "vocab_size")
        self.q_rows = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.kv_rows = cfg.qk_nope_head_dim + cfg.v_head_dim
        self.h0 = h0
        self.i0, self.il = par.split(cfg.intermediate_size, "intermediate_size")
        if cfg.n_routed_experts:
            if par.expert_parallel:
                self.e0, self.el = par.split(cfg.n_routed_experts, "n_routed_experts")
            else:
                self.m0, self.ml = par.split(cfg.moe_intermediate_size, "moe_intermediate_size")
        if cfg.n_shared_experts:
            shared = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.s0, self.sl = par.split(shared, "shared experts' intermediate size")

    def apply(self, sources: list[Source]) -> list[Source]:
        """Sources with this rank's slices (and EP's local expert indices); experts this rank
        does not hold are dropped."""
        if self.par.size == 1:
            return sources
        out = []
        for s in sources:
            t = self._one(s)
            if t is not None:
                out.append(t)
        return out

    def _one(self, s: Source) -> Source | None:
        tgt = s.target
        if tgt in _VOCAB:
            return _cut(s, 0, self.v0, self.vl)
        m = _HEAD_ROWS.search(tgt)
        if m:
            per = self.kv_rows if m.group(1) == "kv_b_proj" else self.q_rows
            return _cut(s, 0, self.h0 * per, self.hl * per)
        if _HEAD_COLS.search(tgt):
            return _cut(s, 1, self.h0 * self.cfg.v_head_dim, self.hl * self.cfg.v_head_dim)
        shared = ".shared_experts." in tgt
        if _MLP_ROWS.search(tgt):
            return _cut(s, 0, *((self.s0, self.sl) if shared else (self.i0, self.il)))
        if _MLP_COLS.search(tgt):
            return _cut(s, 1, *((self.s0, self.sl) if shared else (self.i0, self.il)))
        m = _EXPERTS.search(tgt)
        if m:
            return self._expert(s, m.group(1) == "down_proj")
        return s

    def _expert(self, s: Source, down: bool) -> Source | None:
        if not s.index:
            raise ValueError(
                f"{s.key}: packed expert tensors cannot be sharded; tensor parallelism reads "
                "per-expert checkpoint tensors (experts.N.gate_proj.weight, ...)"
            )
        e = s.index[0]
        if self.par.expert_parallel:
            if not self.e0 <= e < self.e0 + self.el:
                return None  # another rank's expert
            return dataclasses.replace(s, index=(e - self.e0, *s.index[1:]))
        if down:
            return _cut(s, 1, self.m0, self.ml)
        gate = s.index[1].start == 0
        rows = slice(0, self.ml) if gate else slice(self.ml, 2 * self.ml)
        return dataclasses.replace(_cut(s, 0, self.m0, self.ml), index=(e, rows))


def block_slices(src: Source, full_shape: tuple, block: int) -> tuple:
    """The slices of a block-scale tensor that belong to `src`'s slices, which must be whole
    blocks (a dimension's last block may be partial only where the slice reaches its end):
    an FP8 weight kept in e4m3 is sliced together with its scales."""
    if not src.slices:
        return ()
    out = []
    for sl, n in zip(src.slices, full_shape, strict=True):
        if sl.start % block or (sl.stop % block and sl.stop != n):
            raise ValueError(
                f"{src.key}: this rank's shard {sl.start}:{sl.stop} of {n} is not whole "
                f"{block}-blocks, so its FP8 scales cannot be split with it (load it dequantised)"
            )
        out.append(slice(sl.start // block, -(-sl.stop // block)))
    return tuple(out)
