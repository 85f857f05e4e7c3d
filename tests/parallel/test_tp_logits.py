"""Tensor and expert parallelism on CPU: gloo ranks in separate processes load their shards of
tiny checkpoints of both MLA families and must produce the single-process logits (fp32,
1e-5), with and without expert parallelism, under the checkpoint's plan and an IndexCache plan
with S layers, prompts long enough (40 > index_topk 16) that sparse selection is active."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.parallel.spawn import run_ranks

PLANS = (None, "FSSF")


def _check_logits(par, cases):
    from model import load_model
    from model.layers.mlp import Experts

    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 40))
    for path in cases:
        for plan in PLANS:
            ref = load_model(path, plan, torch.float32)
            with torch.no_grad():
                want = ref(ids)
            for ep in (False, True):
                p = dataclasses.replace(par, expert_parallel=ep)
                m = load_model(path, plan, torch.float32, parallel=p)
                experts = m.model.layers[1].mlp.experts
                assert isinstance(experts, Experts)
                e_local = experts.gate_up_proj.shape[0]
                assert e_local == (8 // par.size if ep else 8), (ep, e_local)
                assert m.model.layers[1].self_attn.n_heads == 4 // par.size
                with torch.no_grad():
                    got = m(ids)
                err = (got - want).abs().max().item() / want.abs().max().item()
                assert err <= 1e-5, f"rank {par.rank} {path} plan={plan} ep={ep}: {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4], ids=["tp2", "tp4"])
def test_tp_logits_equal_single_process(size, tiny_dir):
    cases = [tiny_dir("glm_moe_dsa"), tiny_dir("deepseek_v32")]
    run_ranks(size, _check_logits, cases, timeout_s=150)
