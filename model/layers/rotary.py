"""Rotary position embedding: default or YaRN frequencies; interleaved or NeoX pair layout.

MLA rotates interleaved pairs (x0, x1), (x2, x3), ...; DeepSeek-V3.2's indexer rotates NeoX halves
(x_i, x_{i+d/2}); GLM's indexer rotates interleaved pairs (dsa.md 1.3). The layout is chosen per
call so one table of frequencies serves both.
"""

from __future__ import annotations

import math

import torch

from model.config import RopeConfig


def inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies [dim // 2] in fp32, transformers' formulas."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
    extrapolation = 1.0 / pos_freqs
    if rope.kind != "yarn":
        return extrapolation
    interpolation = 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    keep = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


class Rotary:
    """cos/sin for given positions; not an nn.Module since it holds no weights."""

    def __init__(self, rope: RopeConfig, dim: int):
        self.dim = dim
        self.inv_freq = inv_freq(rope, dim)
        self.scale = rope.cos_sin_scale
        self._on: dict[torch.device, torch.Tensor] = {}  # inv_freq per device, copied once

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim // 2] in fp32."""
        f = self._on.get(positions.device)
        if f is None:  # a copy inside every forward would be a host sync (and break graphs)
            f = self._on[positions.device] = self.inv_freq.to(positions.device)
        ang = positions.float()[:, None] * f[None]
        return ang.cos() * self.scale, ang.sin() * self.scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool):
    """x [T, ..., dim] with cos/sin [T, dim // 2]; computed in fp32, returned in x's dtype."""
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[-1]]
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float()
    if interleave:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    else:
        h = x.shape[-1] // 2
        a, b = xf[..., :h], xf[..., h:]
        out = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    return out.to(x.dtype)
