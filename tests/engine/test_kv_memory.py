"""IndexCache frees KV memory: S layers hold no indexer rows, so with a 1/4 plan the indexer bytes
per token are a quarter of all-F's and the same byte budget admits more tokens."""

from __future__ import annotations

import pytest

from serving.engine import LLMEngine


@pytest.mark.parametrize("index_fp8", [False, True])
def test_quarter_plan_quarter_index_bytes_more_tokens(model_dir, index_fp8):
    budget = 2 << 20
    full = LLMEngine.from_pretrained(
        model_dir(), "FFFF", kv_memory_bytes=budget, index_fp8=index_fp8
    )
    quarter = LLMEngine.from_pretrained(
        model_dir(), "FSSS", kv_memory_bytes=budget, index_fp8=index_fp8
    )
    lf, lq = full.layout, quarter.layout
    assert lq.index_bytes_per_token * 4 == lf.index_bytes_per_token
    assert lq.attn_bytes_per_token == lf.attn_bytes_per_token
    assert lq.bytes_per_token == lf.bytes_per_token - 3 * lf.index_bytes_per_token_layer
    # The pool: pages sized from the same budget, and the cache tensors really allocated.
    assert full.kv_capacity_tokens == budget // lf.bytes_per_block * lf.page_size
    assert quarter.kv_capacity_tokens == budget // lq.bytes_per_block * lq.page_size
    assert quarter.kv_capacity_tokens > full.kv_capacity_tokens
    assert quarter.cache.nbytes <= budget and full.cache.nbytes <= budget
    assert [t is None for t in quarter.cache.index_k] == [False, True, True, True]
    s = quarter.stats()
    assert s.index_bytes_per_token == lq.index_bytes_per_token and s.f_layer_ratio == 0.25


def test_stats_count_indexer_work_skipped(model_dir, prompts):
    from serving.engine import SamplingParams

    eng = LLMEngine.from_pretrained(model_dir(), "FSSS", num_blocks=4)
    eng.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    s = eng.stats()
    computed = len(prompts[0]) + 2  # the prompt, then two decode steps (the last token never runs)
    assert s.indexer_layers_run_total == computed * 1
    assert s.indexer_layers_skipped_total == computed * 3
    assert s.prompt_tokens_total == len(prompts[0]) and s.generation_tokens_total == 3
    assert s.kv_blocks_used == 0 and s.kv_usage == 0.0
