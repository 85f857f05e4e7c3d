"""The PyTorch glue between the model's kernels, as pure functions that torch.compile can fuse.

A decode step runs, per layer, a few real kernels (GEMMs, the indexer, sparse attention, the fused
MoE) and dozens of tiny elementwise ops between them (norms in fp32, rotary halves, casts, cats,
the router's masks). Each tiny op is a kernel launch of a few microseconds, and in a 47-layer model
they add up to most of a decode step even inside a CUDA graph. Written as functions of tensors
(weights passed in, no module state), each compiles once for every layer, with the token count
dynamic, into a handful of fused kernels plus the library GEMMs.

Compilation is off unless the engine turns it on for a CUDA model (`set_compile`); CPU runs (tests)
always run these functions eagerly, so both paths compute the same function.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from model.layers.linear import linear
from model.layers.rotary import apply_rotary

log = logging.getLogger(__name__)
_compile = False


def set_compile(on: bool) -> None:
    """Process-wide: compile glue functions called with CUDA tensors (the engine decides)."""
    global _compile
    _compile = bool(on)


def compiling() -> bool:
    return _compile


def glue(fn):
    state = {"compiled": None, "failed": None}

    @functools.wraps(fn)
    def call(x: torch.Tensor, *args, **kwargs):
        if _compile and x.is_cuda and state["failed"] is None:
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, dynamic=True, fullgraph=True)
            try:
                return state["compiled"](x, *args, **kwargs)
            except Exception as e:  # a compiler failure must not take the engine down
                state["failed"] = f"{type(e).__name__}: {e}"[:300]
                log.warning("torch.compile of %s failed, running it eagerly: %s", fn.__name__, e)
        return fn(x, *args, **kwargs)

    call.eager = fn
    call.state = state
    _registry.append(call)
    return call


_registry: list = []


def status() -> dict[str, str]:
    """Per glue function: "compiled", "eager" (never called compiled) or the failure."""
    return {
        f.__name__: f.state["failed"] or ("compiled" if f.state["compiled"] else "eager")
        for f in _registry
    }


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, scale in the input dtype (as transformers' DeepSeek/Llama norms)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@glue
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms(x, w, eps)


@glue
def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float):
    """The residual add and the next norm in one pass: -> (h + delta, norm(h + delta))."""
    h = h + delta
    return h, _rms(h, w, eps)


@glue
def mla_qkv(
    x: torch.Tensor,
    q_a_w: torch.Tensor | None,
    q_a_b: torch.Tensor | None,
    q_norm_w: torch.Tensor | None,
    q_w: torch.Tensor,
    kv_a_w: torch.Tensor,
    kv_a_b: torch.Tensor | None,
    kv_norm_w: torch.Tensor,
    kv_b_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    dn: int,
    dr: int,
    dv: int,
    rank: int,
    eps: float,
    interleave: bool,
):
    """MLA projections in absorbed form -> (qr [T, q_lora] or x, q [T, H, C+R], k [T, 1, C+R]).
    `q_a_w` None: the model has no q LoRA and `q_w` is q_proj."""
    t = x.shape[0]
    if q_a_w is not None:
        qr = _rms(linear(x, q_a_w, q_a_b), q_norm_w, eps)
    else:
        qr = x
    q = linear(qr, q_w).view(t, heads, dn + dr)
    q_nope, q_pe = q[..., :dn], apply_rotary(q[..., dn:], cos, sin, interleave)
    kv = linear(x, kv_a_w, kv_a_b)
    c = _rms(kv[:, :rank], kv_norm_w, eps)
    k_pe = apply_rotary(kv[:, rank:], cos, sin, interleave)
    w = kv_b_w.view(heads, dn + dv, rank)
    q_lat = torch.einsum("thd,hdr->thr", q_nope, w[:, :dn])  # absorb W_UK
    k = torch.cat([c, k_pe], -1)[:, None]
    return qr, torch.cat([q_lat, q_pe], -1), k


@glue
def mla_out(
    o_lat: torch.Tensor, kv_b_w: torch.Tensor, o_w: torch.Tensor, o_b: torch.Tensor | None, dn: int
) -> torch.Tensor:
    """Attention output in latent space [T, H, C] -> [T, d] (absorb W_UV, then o_proj)."""
    t, h, rank = o_lat.shape
    w = kv_b_w.view(h, -1, rank)
    o = torch.einsum("thr,hvr->thv", o_lat, w[:, dn:])
    return linear(o.reshape(t, -1), o_w, o_b)


@glue
def indexer_project(
    x: torch.Tensor,
    q_in: torch.Tensor,
    wq_b: torch.Tensor,
    wk: torch.Tensor,
    kn_w: torch.Tensor,
    kn_b: torch.Tensor,
    kn_eps: float,
    w_proj: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    head_dim: int,
    rope_dim: int,
    interleave: bool,
):
    """-> q [T, HI, DI], k [T, DI] (both rotated), w [T, HI] fp32 with HI^-.5 DI^-.5 folded."""
    t = x.shape[0]
    q = linear(q_in, wq_b).view(t, heads, head_dim)
    k = F.layer_norm(linear(x, wk).float(), (head_dim,), kn_w.float(), kn_b.float(), kn_eps)
    k = k.to(x.dtype)
    # The rotated dims come first in the indexer head (MLA puts them last).
    r = rope_dim
    q = torch.cat([apply_rotary(q[..., :r], cos, sin, interleave), q[..., r:]], -1)
    k = torch.cat([apply_rotary(k[:, :r], cos, sin, interleave), k[:, r:]], -1)
    # Kept in fp32 whatever the model dtype: bf16 rounding here flips near-tied top-k choices.
    w = F.linear(x.float(), w_proj.float()) * (heads**-0.5 * head_dim**-0.5)
    return q, k, w


@glue
def route(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm: bool,
    scaling: float,
):
    """noaux_tc routing -> (weights [T, top_k] fp32, expert ids [T, top_k]); see Router."""
    scores = F.linear(x.float(), w.float()).sigmoid()
    biased = scores + bias
    t, e = biased.shape
    groups = biased.view(t, n_group, e // n_group)
    group_scores = groups.topk(min(2, e // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    biased = biased.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = biased.topk(top_k, dim=-1).indices
    wts = scores.gather(1, ids)
    if norm:
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
    return wts * scaling, ids


@glue
def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    return linear(F.silu(linear(x, w_gate)) * linear(x, w_up), w_down)
