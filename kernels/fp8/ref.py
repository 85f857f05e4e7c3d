"""Reference FP8 quantisation (DeepSeek `act_quant` semantics)."""

from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def act_quant(x: torch.Tensor, block: int, ue8m0: bool):
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    # 1e-4 floor: an all-zero block still gets a finite, positive scale.
    amax = xb.abs().amax(-1).clamp(min=1e-4)
    # Times the fp32 reciprocal, not a division: one correctly rounded fp32 product, so every
    # device and kernel agrees bit for bit (CUDA PyTorch turns a division by a scalar into this).
    scale = amax * (1.0 / FP8_MAX)
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xb / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(shape), scale


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> x @ hadamard(n) in fp32, by butterflies (fast Walsh-Hadamard transform, as
    DeepSeek's rotate_activation): stage h = 1, 2, 4, ... maps each pair (a, b) at distance h to
    (a + b, a - b), then one multiply by fp32(n^-0.5). Every step is a correctly rounded fp32
    add or multiply in a fixed order, so a kernel doing the same steps agrees bit for bit (a
    matmul's summation order is the library's)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard size must be a power of two, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), 2)
        h *= 2
    return y.reshape(x.shape) * n**-0.5


@functools.lru_cache(maxsize=16)
def hadamard(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard matrix (Sylvester order), H @ H.T = I. Applied to both indexer q
    and k before FP8 so outliers spread across the block; exact dot products are unchanged.
    Cached (callers must not modify it): built on the host, so rebuilding it inside a forward
    would copy it to the device every F layer, a host sync that also breaks CUDA-graph capture."""
    if n & (n - 1):
        raise ValueError(f"hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)
