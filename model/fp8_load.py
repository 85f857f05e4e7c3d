"""Which weights of an FP8 checkpoint stay e4m3 under `load_model(keep_fp8=True)`, and the
module swaps and scale sources that keep them.

Kept: whole 2-D weights of plain linears whose K is whole 128-blocks (-> Fp8Linear), and the
per-expert weights of a MoE layer whose d and I are whole 128-blocks (-> Fp8Experts, each
expert's gate and up scales stacked like the weights). Dequantised: kv_b_proj (absorbed MLA
splits it per head and multiplies it into q and the output by einsums, never as a linear),
weights of other shapes, and anything without 128 x 128 blocks.
"""

from __future__ import annotations

import re

import torch

from model.layers.linear import fp8_eligible, swap_to_fp8
from model.layers.mlp import Experts, Fp8Experts
from model.parallel.shard import block_slices
from model.sources import Source

_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _fp8(s: Source, scales: dict) -> bool:
    return s.dtype.startswith("F8") and s.key + "_scale_inv" in scales


def _scale(s: Source, headers: dict, target: str, index: tuple = ()) -> Source:
    """The scale source of kept weight `s`, sliced by block as `s` is (tensor parallelism)."""
    key = s.key + "_scale_inv"
    f, shape, dt = headers[key]
    slices = block_slices(s, headers[s.key][1], 128)
    if slices:
        shape = tuple(sl.stop - sl.start for sl in slices)
    return Source(key, f, shape, dt, target, index, slices)


def plan_fp8(model, sources: list[Source], scales: dict, headers: dict):
    """Swap the kept modules in `model` (on meta); -> (kept weight keys, their scale sources)."""
    q = model.config.quantization
    if q is None or q.block != (128, 128):
        return set(), []
    kept, extra, linears = set(), [], []
    experts: dict[str, list[Source]] = {}
    for s in sources:
        m = _EXPERTS.match(s.target)
        if m and s.index:
            experts.setdefault(m.group(1), []).append(s)
            continue
        if s.index or not _fp8(s, scales) or not s.target.endswith(".weight"):
            continue
        name = s.target.removesuffix(".weight")
        if name.endswith("kv_b_proj"):
            continue
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue  # not a module of this model: the loader's check reports it
        if fp8_eligible(mod) and tuple(mod.weight.shape) == s.shape:
            linears.append(name)
            kept.add(s.key)
            extra.append(_scale(s, headers, s.target + "_scale_inv"))
    swap_to_fp8(model, linears, q.ue8m0)
    for base, srcs in experts.items():
        mod = model.get_submodule(base)
        if not isinstance(mod, Experts) or not all(_fp8(s, scales) for s in srcs):
            continue
        e, two_i, d = mod.gate_up_proj.shape
        inter = two_i // 2
        if d % 128 or inter % 128:
            continue
        parent, _, child = base.rpartition(".")
        with torch.device("meta"):
            setattr(model.get_submodule(parent), child, Fp8Experts(e, d, inter, q.ue8m0))
        ib = inter // 128
        for s in srcs:
            kept.add(s.key)
            if s.target.endswith("down_proj"):
                extra.append(_scale(s, headers, base + ".down_proj_scale_inv", s.index[:1]))
            else:
                rows = slice(0, ib) if s.index[1].start == 0 else slice(ib, 2 * ib)
                extra.append(
                    _scale(s, headers, base + ".gate_up_proj_scale_inv", (s.index[0], rows))
                )
    return kept, extra
