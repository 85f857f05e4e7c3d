"""The tiny models give the same logits with the Triton kernels as with the references, through
an engine-like sequence of steps: a packed varlen prefill chunk, a mixed step (the rest of one
prompt beside another sequence's first decode token, over cached prefixes), then a decode step.
IndexCache plans with S layers are included, so reused top-k indices flow through the kernels.

16 indexer heads instead of the tiny default 4: a key scores exactly 0 when every head's dot
product is negative, and such ties at the top-k boundary may be broken differently by the two
top-k implementations (both correct), which would make the logits differ for no fault."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.testing import assert_close
from model import ForwardContext, KVCache, load_model

STEPS = [([30, 23], [0, 0]), ([10, 1], [30, 23]), ([1, 1], [40, 24])]


def run_steps(model, backend: str, index_fp8: bool) -> list[torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 41), device=model.device)
    layout = model.kv_layout(index_fp8)
    pages = -(-41 // layout.page_size)
    cache = KVCache(layout, 2 * pages, model.device)
    tables = torch.arange(2 * pages, dtype=torch.int32, device=model.device).view(2, pages)
    kernels.set_backend(backend)
    try:
        logits = []
        for new, cached in STEPS:
            ctx = ForwardContext.for_batch(new, cached, tables, cache)
            step_ids = torch.cat(
                [ids[b, c : c + n] for b, (n, c) in enumerate(zip(new, cached, strict=True))]
            )
            with torch.no_grad():
                logits.append(model(step_ids, ctx).float())
        return logits
    finally:
        kernels.set_backend("auto")


def _compare(tiny_dir, kind, plan, index_fp8, device):
    path = tiny_dir(kind, index_n_heads=16)
    model = load_model(path, index_cache=plan, dtype=torch.float32, device=device)
    ref = run_steps(model, "ref", index_fp8)
    out = run_steps(model, "triton", index_fp8)
    for step, (r, o) in enumerate(zip(ref, out, strict=True)):
        assert_close(f"{kind} step {step} logits", r, o, 1e-4)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "kind, plan", [("glm_moe_dsa", "FSFS"), ("dsa_llama", None)], ids=["mla-FSFS", "gqa-all-F"]
)
def test_logits_triton_vs_ref(tiny_dir, kind, plan, device):
    _compare(tiny_dir, kind, plan, False, device)


@pytest.mark.gpu
@pytest.mark.parametrize("index_fp8", [False, True], ids=["index-bf", "index-fp8"])
@pytest.mark.parametrize(
    "kind, plan",
    [("deepseek_v32", None), ("glm_moe_dsa", "FSSF"), ("dsa_llama", "FFSS")],
    ids=["dsv32-all-F", "glm-FSSF", "llama-FFSS"],
)
def test_logits_triton_vs_ref_gpu(tiny_dir, kind, plan, index_fp8, device):
    _compare(tiny_dir, kind, plan, index_fp8, device)


SMOLLM_SHAPES = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    index_n_heads=4,
    index_head_dim=64,
    index_rope_head_dim=32,
    index_topk=256,
    max_position_embeddings=8192,
)


@pytest.mark.gpu
def test_smollm_shapes_prefill_triton_vs_ref(tiny_dir, device):
    """The served default's shapes (GQA 9 heads over 3 KV heads, head dim 64, indexer 4 x 64,
    top-256) at 1024 tokens, so selection drops three quarters of the keys. fp32 with TF32 off:
    with TF32 matmuls the two paths round scores differently and flip near-tied top-k picks."""
    path = tiny_dir("dsa_llama", **SMOLLM_SHAPES)
    model = load_model(path, dtype=torch.float32, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, 1024), device=device)
    out = {}
    for impl in ("ref", "triton"):
        kernels.set_backend(impl)
        try:
            with torch.no_grad():
                out[impl] = model(ids).float()
        finally:
            kernels.set_backend("auto")
    assert_close("smollm-shaped logits", out["ref"], out["triton"], 1e-4)
