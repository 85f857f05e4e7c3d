"""Tensor parallelism on GPUs (NCCL), marked gpu: run on a machine with two or more GPUs
(python -m pytest -m gpu tests/parallel). TP over every visible GPU (at most 8): a random
DeepSeek-V3.2-shaped FP8 checkpoint's logits against one GPU (Triton kernels), and the
tensor-parallel engine's greedy tokens (CUDA graphs) against the one-GPU engine's. Both in
fp32 (Triton dots in IEEE fp32: tests/conftest.py), so only summation order differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.testing import assert_close
from tests.engine.conftest import GREEDY, HEADS
from tests.parallel.spawn import run_ranks
from tests.parallel.test_tp_engine import SETTINGS, _prompts

pytestmark = pytest.mark.gpu


def _size() -> int:
    """The largest power of two <= min(GPUs, 8): the test shapes divide by it."""
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs 2 or more GPUs for NCCL tensor parallelism, this machine has {count}")
    return 1 << (min(count, 8).bit_length() - 1)


def _fp8_gpu_checkpoint(out, n):
    from model.random_checkpoint import write_random_fp8

    # Shards of whole 128-blocks at TP = 2, 4, 8: 16 heads (q rows 192 each, o columns 128).
    small = dict(
        vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=512,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, index_topk=64,
        first_k_dense_replace=1, max_position_embeddings=8192,
    )  # fmt: skip
    return str(write_random_fp8(out, "deepseek_v32", num_layers=4, overrides=small, std=0.03))


def _ids() -> torch.Tensor:
    return torch.randint(0, 261, (2, 300), generator=torch.Generator().manual_seed(0))


def _logits(par, path, want):
    from model import load_model

    for ep in (False, True):
        p = dataclasses.replace(par, expert_parallel=ep)
        m = load_model(path, None, torch.float32, f"cuda:{par.rank}", True, p)
        with torch.no_grad():
            got = m(_ids().cuda()).cpu()
        assert_close(f"rank {par.rank} ep={ep}", want, got, 1e-4)


def test_gpu_tp_fp8_logits_match_one_gpu(tmp_path):
    from model import load_model

    n = _size()
    path = _fp8_gpu_checkpoint(tmp_path / "fp8", n)
    with torch.no_grad():
        want = load_model(path, None, torch.float32, "cuda", keep_fp8=True)(_ids().cuda()).cpu()
    run_ranks(n, _logits, path, want, backend="nccl", timeout_s=600)


def _engine(par, path, want, rdv):
    from serving.engine import SamplingParams
    from serving.engine.tp import start_rank

    torch.distributed.destroy_process_group()
    settings = {**SETTINGS, "device": "cuda", "dtype": "float32",
                "tensor_parallel_size": par.size, "expert_parallel": True}  # fmt: skip
    eng = start_rank(path, None, settings, par.rank, rdv, "nccl", 300, f"cuda:{par.rank}")
    if eng is None:
        return
    try:
        outs = eng.generate(_prompts(), SamplingParams(**GREEDY))
        assert [o.token_ids for o in outs] == want
        assert eng.runner.graphs is not None and eng.runner.graphs.replays > 0
    finally:
        eng.shutdown()


def test_gpu_tp_engine_greedy_equals_one_gpu(tiny_dir, tmp_path):
    from serving.engine import LLMEngine, SamplingParams

    n = _size()
    path = tiny_dir("glm_moe_dsa", **HEADS)  # 4 heads: TP over at most 4 ranks
    n = min(n, 4)
    single = LLMEngine.from_pretrained(path, device="cuda", dtype="float32", **SETTINGS)
    want = [o.token_ids for o in single.generate(_prompts(), SamplingParams(**GREEDY))]
    run_ranks(n, _engine, path, want, f"file://{tmp_path}/rdv", backend="nccl", timeout_s=600)
