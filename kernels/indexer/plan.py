"""Launch plan of the Triton prefill indexer, computed on the host from the forward's own lists.

Every F layer of one forward launches over the same query tiles and groups, so the engine plans
them once per forward from the host lists it already has (no `.tolist()` of device tensors per
layer) and ships the tile table in the step's one host-to-device copy
(serving/engine/step_state.py).
No Triton import here: the plan is plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._common import cdiv

# Scratch scores per launch group, and rows per group (which bounds the top-k candidate buffers).
SCORE_BUDGET = 512 << 20
MAX_ROWS = 4096

PREFILL_CONFIGS = [
    {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 256, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 3},
]
# Chosen from the H200 sweeps of kernels/bench.py (benchmarks/README.md): FP8 favours the
# smaller tile (fp8 MMA is twice as fast, so the per-head relu/weight epilogue weighs more).
DEFAULT_PREFILL = {torch.float8_e4m3fn: PREFILL_CONFIGS[0]}
DEFAULT_PREFILL_16 = PREFILL_CONFIGS[1]
# Interpreter (CPU tests): small tiles keep per-program numpy work low.
INTERPRET_PREFILL = {"BM": 16, "BN": 32, "num_warps": 4, "num_stages": 1}

Tile = tuple[int, int, int, int]  # (sequence, first row, rows, first position)
# (first tile, end tile, rows, padded visible width, first row)
Group = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class PrefillTiles:
    """One forward's prefill launch plan on the device, shared by all its F layers."""

    tiles: torch.Tensor  # [n, 4] int32: the Tile rows
    groups: tuple[Group, ...]
    lengths: torch.Tensor  # [T] int32: visible keys of each query row (its position + 1)
    config: dict  # the logits-kernel config the tiles were cut for


def prefill_config(dtype: torch.dtype, interpret: bool) -> dict:
    if interpret:
        return INTERPRET_PREFILL
    return DEFAULT_PREFILL.get(dtype, DEFAULT_PREFILL_16)


def tiles_of(cu: list[int], lens: list[int], bm: int) -> list[Tile]:
    """Query tiles; a tile never spans two sequences, since each reads its own block table."""
    tiles = []
    for b, n in enumerate(lens):
        lo, hi = cu[b], cu[b + 1]
        first = n - (hi - lo)
        if first < 0:
            raise ValueError(f"indexer: sequence {b} has {hi - lo} queries but seq_lens {n}")
        tiles += [(b, r, min(bm, hi - r), first + r - lo) for r in range(lo, hi, bm)]
    return tiles


def groups_of(tiles: list[Tile], bn: int, budget: int, max_rows: int) -> list[Group]:
    """Consecutive tiles whose scratch scores (rows x padded visible width) fit the budget."""
    groups, start, rows, width = [], 0, 0, 0
    for i, (_, _, nr, p0) in enumerate(tiles):
        w = max(width, cdiv(p0 + nr, bn) * bn)
        if i > start and ((rows + nr) * w * 4 > budget or rows + nr > max_rows):
            groups.append((start, i, rows, width, tiles[start][1]))
            start, rows, w = i, 0, cdiv(p0 + nr, bn) * bn
        rows, width = rows + nr, w
    if start < len(tiles):
        groups.append((start, len(tiles), rows, width, tiles[start][1]))
    return groups


def plan_prefill(
    cu: list[int],
    lens: list[int],
    cfg: dict,
    budget: int = SCORE_BUDGET,
) -> tuple[list[Tile], list[Group]]:
    """Host lists (query offsets [B+1], keys per sequence [B]) -> tiles and launch groups."""
    tiles = tiles_of(cu, lens, cfg["BM"])
    return tiles, groups_of(tiles, cfg["BN"], budget, MAX_ROWS)
