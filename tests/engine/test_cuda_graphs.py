"""Decode through captured CUDA graphs gives the tokens eager decode gives, for all-F and a plan,
at several batch sizes (buckets with padding rows), with requests joining and leaving between
steps; and the engine's memory stays inside gpu_memory_utilization of the card."""

from __future__ import annotations

import pytest
import torch

from serving.engine import LLMEngine, SamplingParams

pytestmark = pytest.mark.gpu

# (prompt length, max_tokens, the step at which the request joins)
SCHEDULE = [(60, 12, 0), (97, 5, 0), (126, 9, 2), (33, 14, 3), (70, 3, 6), (150, 8, 6), (40, 6, 9)]


def run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    step = 0
    pending = list(enumerate(SCHEDULE))
    while pending or engine.has_unfinished():
        while pending and pending[0][1][2] <= step:
            i, (_, n, _) = pending.pop(0)
            engine.add_request(
                f"r{i}", prompts[i], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            )
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    return out


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(5, 300, (n,), generator=g).tolist() for n, _, _ in SCHEDULE]


@pytest.mark.parametrize("plan", [None, "FSSF"], ids=["all-F", "FSSF"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_matches_eager(model_dir, prompts, plan, dtype):
    kw = dict(device="cuda", dtype=dtype, num_blocks=32, max_num_seqs=8, max_num_batched_tokens=64)
    eager = LLMEngine.from_pretrained(model_dir(), plan, enforce_eager=True, **kw)
    graphs = LLMEngine.from_pretrained(model_dir(), plan, cuda_graph_max_batch=8, **kw)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    want, got = run(eager, prompts), run(graphs, prompts)
    assert got == want
    assert graphs.runner.graphs.replays > 5  # decode steps really replayed graphs
    assert all(len(got[f"r{i}"]) == n for i, (_, n, _) in enumerate(SCHEDULE))
    for e in (eager, graphs):
        assert e.block_manager.num_free == e.block_manager.num_blocks
        assert e.runner.tables.num_rows_in_use == 0


def test_batch_beyond_largest_graph_runs_eagerly(model_dir, prompts):
    eng = LLMEngine.from_pretrained(
        model_dir(), "FSSF", device="cuda", num_blocks=32, max_num_seqs=8, cuda_graph_max_batch=2
    )
    ref = LLMEngine.from_pretrained(
        model_dir(), "FSSF", device="cuda", num_blocks=32, max_num_seqs=8, enforce_eager=True
    )
    assert eng.runner.graphs.buckets == [1, 2]
    assert run(eng, prompts) == run(ref, prompts)


def test_memory_stays_within_utilization(model_dir):
    torch.cuda.empty_cache()
    util = 0.3
    eng = LLMEngine.from_pretrained(model_dir(), device="cuda", gpu_memory_utilization=util)
    free, total = torch.cuda.mem_get_info()
    assert total - free <= util * total + (256 << 20)  # allocator rounding slack
    assert eng.kv_capacity_tokens > 0
    eng.generate([[5] * 100], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    free, total = torch.cuda.mem_get_info()
    assert total - free <= util * total + (256 << 20)


def test_one_token_prompt_chunks_run_eagerly(model_dir, prompts):
    """A budget of 3 tokens a step with two requests decoding leaves 1-token chunks to a third
    prompt, so a batch has one new token in every row while one row is mid-prompt. That row must
    not sample (nor be replayed by a graph, which samples every row): tokens equal eager ones."""
    kw = dict(device="cuda", num_blocks=32, max_num_seqs=8, max_num_batched_tokens=3)
    eager = LLMEngine.from_pretrained(model_dir(), enforce_eager=True, **kw)
    graphs = LLMEngine.from_pretrained(model_dir(), cuda_graph_max_batch=8, **kw)
    mixed = []
    run_batch = graphs.runner.run

    def spy(batch):
        if all(n == 1 for n in batch.num_new):
            mixed.append(any(s.num_cached + 1 < s.num_tokens for s in batch.seqs))
        return run_batch(batch)

    graphs.runner.run = spy
    plan = [("a", prompts[0][:3], 30, 0), ("b", prompts[1][:3], 30, 0), ("c", prompts[2], 4, 4)]
    got = [one_token_chunks(e, plan) for e in (graphs, eager)]
    assert got[0] == got[1]
    assert any(mixed) and graphs.runner.graphs.replays > 0


def one_token_chunks(engine: LLMEngine, plan) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for step in range(400):
        for rid, p, n, at in plan:
            if at == step:
                sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                engine.add_request(rid, p, sp)
        if step > 4 and not engine.has_unfinished():
            break
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    assert all(len(out[rid]) == n for rid, _, n, _ in plan), out
    return out
