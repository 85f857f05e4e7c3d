"""FP8 linears: weights kept as the checkpoint ships them (e4m3, one fp32 scale per 128 x 128
block), multiplied by kernels.fp8_gemm with per-token activation scales.

The model's glue functions take weights as tensors; an FP8 weight travels as the tuple
`(weight, weight_scale_inv, ue8m0)` (`weight_of`) and `linear` dispatches on it. The GEMM is
registered as a custom op so that torch.compile keeps the glue around it in one graph (the op is
opaque to it, shapes from the fake) instead of breaking the graph at a Triton launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fp8_gemm import BLOCK, fp8_linear

Fp8Weight = tuple  # (weight [N, K] e4m3, weight_scale_inv [ceil(N/128), K/128] fp32, ue8m0)


@torch.library.custom_op("indexcache::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None, ue8m0: bool
) -> torch.Tensor:
    return fp8_linear(x, w, s, bias, ue8m0)


@_fp8_linear_op.register_fake
def _(x, w, s, bias, ue8m0):
    return x.new_empty(*x.shape[:-1], w.shape[0])


class Fp8Linear(nn.Module):
    """nn.Linear's interface over an e4m3 weight and its block scales (`weight_scale_inv`, a
    multiplier despite the name: the checkpoints' key). Not trainable."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ue8m0: bool):
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"Fp8Linear: in_features={in_features} is not a multiple of {BLOCK}")
        self.in_features, self.out_features, self.ue8m0 = in_features, out_features, ue8m0
        e4m3 = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn)
        self.weight = nn.Parameter(e4m3, requires_grad=False)
        blocks = (-(-out_features // BLOCK), in_features // BLOCK)
        self.weight_scale_inv = nn.Parameter(torch.ones(blocks), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, weight_of(self), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def weight_of(mod: nn.Module):
    """What a glue function takes for this linear: its weight tensor, or the FP8 tuple."""
    if isinstance(mod, Fp8Linear):
        return (mod.weight, mod.weight_scale_inv, mod.ue8m0)
    return mod.weight


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a weight tensor or an FP8 tuple from `weight_of`."""
    if isinstance(w, tuple):
        return _fp8_linear_op(x, w[0], w[1], bias, w[2])
    return F.linear(x, w, bias)


def fp8_eligible(mod: nn.Module) -> bool:
    """A plain nn.Linear whose K is whole 128-blocks: what `swap_to_fp8` can replace."""
    return type(mod) is nn.Linear and mod.in_features % BLOCK == 0


def swap_to_fp8(model: nn.Module, names: list[str], ue8m0: bool) -> None:
    """Replace the named nn.Linear submodules by Fp8Linear of the same shape (on meta, before
    loading: the loader fills weight and weight_scale_inv from the checkpoint)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        with torch.device("meta"):
            new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, ue8m0)
        setattr(parent, child, new)
