"""Paged KV cache layout and storage, derived from the model config and the IndexCache plan.

Per layer the attention rows: MLA stores one 576-wide row per token (512 latent + 64 rope key);
grouped-query models store k and v rows per KV head. Indexer key rows (+ an fp32 scale in FP8
mode: 128 + 4 = 132 B/token) exist only for F layers: S layers never score keys, so reserving
their rows would waste the memory IndexCache frees (upstream patches keep it allocated).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from model.config import ModelConfig
from model.index_cache import IndexCacheConfig

PAGE_SIZE = 64


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    attn_kind: str  # "mla" | "gqa"
    kv_heads: int  # 1 for MLA
    k_dim: int  # MLA: kv_lora_rank + rope dim (576); GQA: head_dim
    v_dim: int  # MLA: kv_lora_rank (a view of the k row); GQA: head_dim
    index_layers: tuple[int, ...]  # F layers: the only ones holding indexer keys
    index_head_dim: int
    index_fp8: bool
    dtype: str  # attention rows' dtype name, e.g. "bfloat16"
    plan_id: str
    page_size: int = PAGE_SIZE

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        plan: IndexCacheConfig,
        dtype: torch.dtype,
        index_fp8: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> KVLayout:
        if cfg.is_mla:
            kind, heads = "mla", 1
            k_dim, v_dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
        else:
            kind, heads, k_dim, v_dim = "gqa", cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim
        return cls(
            num_layers=cfg.num_hidden_layers,
            attn_kind=kind,
            kv_heads=heads,
            k_dim=k_dim,
            v_dim=v_dim,
            index_layers=plan.full_layers,
            index_head_dim=cfg.index_head_dim,
            index_fp8=index_fp8,
            dtype=str(dtype).removeprefix("torch."),
            plan_id=plan.plan_id,
            page_size=page_size,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def attn_bytes_per_token_layer(self) -> int:
        elt = torch.finfo(self.torch_dtype).bits // 8
        rows = self.k_dim if self.attn_kind == "mla" else self.k_dim + self.v_dim
        return self.kv_heads * rows * elt

    @property
    def index_bytes_per_token_layer(self) -> int:
        if self.index_fp8:
            return self.index_head_dim + 4  # e4m3 bytes + one fp32 scale
        return self.index_head_dim * (torch.finfo(self.torch_dtype).bits // 8)

    @property
    def attn_bytes_per_token(self) -> int:
        return self.num_layers * self.attn_bytes_per_token_layer

    @property
    def index_bytes_per_token(self) -> int:
        return len(self.index_layers) * self.index_bytes_per_token_layer

    @property
    def bytes_per_token(self) -> int:
        return self.attn_bytes_per_token + self.index_bytes_per_token

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.page_size

    def blocks_for_budget(self, budget_bytes: int) -> int:
        return int(budget_bytes) // self.bytes_per_block

    def to_dict(self) -> dict:
        d = asdict(self)
        d["index_layers"] = list(self.index_layers)
        return d


class KVCache:
    """Per-layer paged tensors of one layout. Pages are handed out by the engine's block manager."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.layout, self.num_blocks = layout, num_blocks
        p, ps, h = num_blocks, layout.page_size, layout.kv_heads
        dt = layout.torch_dtype
        if layout.attn_kind == "mla":
            self.k = [
                torch.zeros(p, ps, 1, layout.k_dim, dtype=dt, device=device)
                for _ in range(layout.num_layers)
            ]
            self.v = [k[..., : layout.v_dim] for k in self.k]  # the latent is the value
        else:
            self.k = [
                torch.zeros(p, ps, h, layout.k_dim, dtype=dt, device=device)
                for _ in range(layout.num_layers)
            ]
            self.v = [
                torch.zeros(p, ps, h, layout.v_dim, dtype=dt, device=device)
                for _ in range(layout.num_layers)
            ]
        idx_dt = torch.float8_e4m3fn if layout.index_fp8 else dt
        self.index_k: list[torch.Tensor | None] = [None] * layout.num_layers
        self.index_scale: list[torch.Tensor | None] = [None] * layout.num_layers
        for i in layout.index_layers:
            self.index_k[i] = torch.zeros(p, ps, layout.index_head_dim, dtype=idx_dt, device=device)
            if layout.index_fp8:
                self.index_scale[i] = torch.ones(p, ps, dtype=torch.float32, device=device)

    def shared_as(self, layout: KVLayout) -> KVCache:
        """This pool's memory seen through another plan's layout, no copy: the same attention rows
        and the indexer rows of the other plan's F layers (which must be F layers here too).
        Benchmarks step two plans alternately on one pool this way."""
        mine = KVLayout(
            **{
                **self.layout.to_dict(),
                "index_layers": layout.index_layers,
                "plan_id": layout.plan_id,
            }
        )
        if mine != layout:
            raise ValueError(f"layouts differ beyond the plan: {self.layout} vs {layout}")
        missing = set(layout.index_layers) - set(self.layout.index_layers)
        if missing:
            raise ValueError(f"layers {sorted(missing)} hold no indexer rows in this pool")
        view = object.__new__(KVCache)
        view.layout, view.num_blocks = layout, self.num_blocks
        view.k, view.v = self.k, self.v
        keep = set(layout.index_layers)
        view.index_k = [t if i in keep else None for i, t in enumerate(self.index_k)]
        view.index_scale = [t if i in keep else None for i, t in enumerate(self.index_scale)]
        return view

    def tensors(self) -> list[torch.Tensor]:
        """Every distinct storage tensor (v views of MLA rows excluded)."""
        out = list(self.k)
        if self.layout.attn_kind == "gqa":
            out += self.v
        out += [t for t in self.index_k + self.index_scale if t is not None]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
