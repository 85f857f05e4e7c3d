"""Dense SwiGLU MLP and the DeepSeek-V3 MoE (sigmoid routing, group-limited top-k, correction bias,
routed scaling, shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.moe import fused_moe, fused_moe_fp8
from model.config import ModelConfig
from model.layers.glue import route, swiglu
from model.layers.linear import weight_of
from model.parallel.group import SINGLE, Parallel


class MLP(nn.Module):
    """SwiGLU. Under tensor parallelism `inter` is this rank's share; `reduce` sums the ranks'
    partial outputs (off for the shared experts: MoE sums them with the routed ones, once)."""

    def __init__(self, hidden: int, inter: int, par: Parallel = SINGLE, reduce: bool = True):
        super().__init__()
        self.par, self.reduce = par, reduce
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = swiglu(
            x, weight_of(self.gate_proj), weight_of(self.up_proj), weight_of(self.down_proj)
        )
        return self.par.all_reduce(out) if self.reduce else out


class Router(nn.Module):
    """noaux_tc routing: choose among the best `topk_group` groups (each scored by its two best
    biased experts), the bias steers selection only, weights come from the unbiased sigmoid."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e = cfg.n_routed_experts
        if e % cfg.n_group:
            raise ValueError(f"n_routed_experts={e} is not divisible by n_group={cfg.n_group}")
        self.weight = nn.Parameter(torch.zeros(e, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(e, dtype=torch.float32), requires_grad=False
        )
        self.top_k, self.n_group, self.topk_group = (
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
        )
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (weights [T, top_k] fp32, expert ids [T, top_k])."""
        return route(
            x,
            self.weight,
            self.e_score_correction_bias,
            self.n_group,
            self.topk_group,
            self.top_k,
            self.norm,
            self.scaling,
        )


def local_experts(cfg: ModelConfig, par: Parallel) -> tuple[int, int, int]:
    """(first expert, experts, intermediate size) this rank holds: E / N whole experts with
    expert parallelism, else every expert's I / N slice."""
    if par.expert_parallel:
        return (*par.split(cfg.n_routed_experts, "n_routed_experts"), cfg.moe_intermediate_size)
    i = par.split(cfg.moe_intermediate_size, "moe_intermediate_size")[1]
    return 0, cfg.n_routed_experts, i


class Experts(nn.Module):
    """Routed experts packed as 3-D tensors (loader stacks per-expert checkpoint weights)."""

    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE):
        super().__init__()
        _, e, i = local_experts(cfg, par)
        d = cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, d], routing weights w [T, k] fp32 and expert ids [T, k] -> [T, d]."""
        return fused_moe(x, self.gate_up_proj, self.down_proj, w, ids)


class Fp8Experts(nn.Module):
    """Routed experts kept in e4m3 with one fp32 scale per 128 x 128 block of each expert's
    weights (the FP8 checkpoints' layout, stacked): kernels.moe.fused_moe_fp8."""

    def __init__(self, n_experts: int, d: int, inter: int, ue8m0: bool):
        super().__init__()
        e4m3 = torch.float8_e4m3fn

        def param(*shape, dtype=torch.float32):
            return nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False)

        self.gate_up_proj = param(n_experts, 2 * inter, d, dtype=e4m3)
        self.gate_up_proj_scale_inv = param(n_experts, 2 * inter // 128, d // 128)
        self.down_proj = param(n_experts, d, inter, dtype=e4m3)
        self.down_proj_scale_inv = param(n_experts, d // 128, inter // 128)
        self.ue8m0 = ue8m0

    def forward(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe_fp8(
            x,
            self.gate_up_proj,
            self.gate_up_proj_scale_inv,
            self.down_proj,
            self.down_proj_scale_inv,
            w,
            ids,
            self.ue8m0,
        )


class MoE(nn.Module):
    """Router, routed experts and shared experts. Under tensor parallelism every rank routes
    every token (the router is replicated and its input identical on all ranks); with expert
    parallelism a rank runs only the slots routed to its experts (the others are marked -1,
    which the MoE op skips: dispatch is a mask, since each rank already has every token), and
    one all-reduce combines routed and shared experts' partial sums."""

    def __init__(self, cfg: ModelConfig, par: Parallel = SINGLE):
        super().__init__()
        self.par = par
        self.first_expert, self.n_local, _ = local_experts(cfg, par)
        self.gate = Router(cfg)
        self.experts = Experts(cfg, par)
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = (
            MLP(cfg.hidden_size, par.split(shared, "shared experts' size")[1], par, reduce=False)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.gate(x)
        if self.par.expert_parallel and self.par.size > 1:
            local = ids - self.first_expert
            ids = torch.where((local >= 0) & (local < self.n_local), local, -1)
        out = self.experts(x, w, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.par.all_reduce(out)
