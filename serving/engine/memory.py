"""How many KV pages an engine gets.

Explicit sizes win: `num_blocks`, then `kv_memory_bytes`. Otherwise, on CUDA,
`gpu_memory_utilization` is a share of the card's *total* memory (vLLM's meaning) that must hold
everything the engine uses: what is in use on the card when the engine starts (its weights, the
CUDA context, anything other processes hold), the activation peak of the largest step (measured
by a profiling forward of one full chunk), the pool of the decode CUDA graphs (measured by
profiling the largest captured batch), and the KV pool, which gets the rest. So the graphs come
out of the share, not on top of it, and a second engine on the card cannot take what the first
one uses.

On CPU the pool defaults to a small fixed budget: CPU runs are tests and smoke runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.kv_cache import KVLayout
from serving.engine.config import EngineConfig

CPU_DEFAULT_KV_BYTES = 256 << 20
# The indexer's prefill score scratch grows with the context up to its fixed budget
# (kernels/indexer/triton.py SCORE_BUDGET); the profiling forward sees only a fresh chunk's share.
INDEXER_SCRATCH_BYTES = 512 << 20


@dataclass(frozen=True)
class Profile:
    activation_bytes: int  # peak above the steady state during the largest eager step
    graph_bytes: int  # peak of the largest captured decode batch (0 without graphs)


def resolve_num_blocks(
    cfg: EngineConfig,
    layout: KVLayout,
    max_model_len: int,
    profile: Callable[[], Profile] | None,
) -> int:
    """Pages for the pool. `profile` runs the profiling forwards (CUDA only)."""
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
    pages_per_seq = math.ceil(max_model_len / layout.page_size)
    want = cfg.max_num_seqs * pages_per_seq * layout.bytes_per_block  # never more than all can use
    budget = CPU_DEFAULT_KV_BYTES
    if cfg.torch_device.type == "cuda":
        budget = cuda_kv_budget(cfg, profile() if profile else Profile(0, 0))
    n = layout.blocks_for_budget(min(budget, want))
    if n < 1:
        raise ValueError(
            f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves no room for one KV page "
            f"({layout.bytes_per_block} bytes) after weights, activations and CUDA graphs; "
            "raise it, or pass num_blocks or kv_memory_bytes"
        )
    return n


def cuda_kv_budget(cfg: EngineConfig, prof: Profile) -> int:
    dev = cfg.torch_device
    free, total = torch.cuda.mem_get_info(dev)
    in_use = total - free
    share = int(total * cfg.gpu_memory_utilization)
    budget = share - in_use - prof.activation_bytes - INDEXER_SCRATCH_BYTES - prof.graph_bytes
    if budget < 1:
        gib = 1 << 30
        raise ValueError(
            f"gpu_memory_utilization={cfg.gpu_memory_utilization} gives this engine "
            f"{share / gib:.1f} GiB of the card's {total / gib:.1f} GiB, but "
            f"{in_use / gib:.1f} GiB are in use already (weights, CUDA context, other "
            "processes) and one step needs "
            f"{(prof.activation_bytes + INDEXER_SCRATCH_BYTES) / gib:.1f} GiB of activations and "
            f"{prof.graph_bytes / gib:.2f} GiB of CUDA graphs: no room for the KV pool"
        )
    return budget
