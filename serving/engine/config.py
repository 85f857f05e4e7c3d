"""Engine knobs (frozen) and the KV pool size they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from model.config import ModelConfig
from model.kv_cache import KVLayout

Role = Literal["unified", "prefill", "decode"]
ROLES = ("unified", "prefill", "decode")

# Without a budget on CPU the pool is capped here: CPU runs are tests and smoke runs.
CPU_DEFAULT_KV_BYTES = 256 << 20


@dataclass(frozen=True)
class EngineConfig:
    role: Role = "unified"
    max_num_seqs: int = 64  # sequences admitted at once
    max_num_batched_tokens: int = 512  # token budget per step (the prefill chunk size)
    max_model_len: int | None = None  # prompt + output tokens; None = the model's maximum
    num_blocks: int | None = None  # KV pages; overrides kv_memory_bytes
    kv_memory_bytes: int | None = None  # KV byte budget; None = derived from free memory
    index_fp8: bool = False  # indexer keys in e4m3 + fp32 scale (132 B/token/F layer at DI=128)
    gpu_memory_utilization: float = 0.9  # share of free GPU memory the default budget may take
    enable_prefix_caching: bool = True  # reuse cached full pages of earlier requests' prefixes
    # Share of the pool admission keeps free while requests run (at least one page when > 0), so
    # decoding requests can grow without preempting the request just admitted.
    kv_watermark: float = 0.01
    max_queue_bypass: int = 8  # requests admitted ahead of a queue head that does not fit yet

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("max_model_len", "num_blocks", "kv_memory_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        if not isinstance(self.kv_watermark, int | float) or not 0 <= self.kv_watermark < 1:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark!r}")
        if not isinstance(self.max_queue_bypass, int) or self.max_queue_bypass < 0:
            raise ValueError(
                f"max_queue_bypass must be an integer >= 0, got {self.max_queue_bypass!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )


def watermark_pages(cfg: EngineConfig, num_blocks: int) -> int:
    """Pages admission leaves free while requests run."""
    return math.ceil(cfg.kv_watermark * num_blocks) if cfg.kv_watermark > 0 else 0


def resolve_num_blocks(
    cfg: EngineConfig,
    model_cfg: ModelConfig,
    layout: KVLayout,
    max_model_len: int,
    device: torch.device,
) -> int:
    """Pages for the pool: explicit count > byte budget > a default from free memory."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    if cfg.kv_memory_bytes is not None:
        n = layout.blocks_for_budget(cfg.kv_memory_bytes)
        if n < 1:
            raise ValueError(
                f"kv_memory_bytes={cfg.kv_memory_bytes} holds no page "
                f"({layout.bytes_per_block} bytes per {layout.page_size}-token page)"
            )
        return n
    pages_per_seq = -(-max_model_len // layout.page_size)
    want = cfg.max_num_seqs * pages_per_seq * layout.bytes_per_block  # never more than all can use
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Rough activation reserve: hidden states of one full step plus sampling logits.
        reserve = (1 << 30) + 64 * cfg.max_num_batched_tokens * model_cfg.hidden_size * 4
        reserve += 4 * cfg.max_num_seqs * model_cfg.vocab_size * 4
        budget = int(free * cfg.gpu_memory_utilization) - reserve
    else:
        budget = CPU_DEFAULT_KV_BYTES
    n = layout.blocks_for_budget(min(budget, want))
    if n < 1:
        raise ValueError(
            f"not enough free memory for one KV page ({layout.bytes_per_block} "
            "bytes); pass num_blocks or kv_memory_bytes"
        )
    return n
