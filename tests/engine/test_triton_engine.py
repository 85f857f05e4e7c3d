"""The engine's own step metadata (packed lists, persistent block tables, the indexer tile plan
shared by all F layers) drives the Triton kernels to the same greedy tokens as the references:
chunked prefill beside decode rows, an S layer after a chunk boundary, and page growth."""

from __future__ import annotations

import pytest

import kernels
from serving.engine import LLMEngine, SamplingParams
from tests.engine.conftest import GREEDY


@pytest.mark.interpret
def test_triton_engine_matches_reference_engine(model_dir, prompts, reference):
    plan = "FSSF"  # F, two S layers (one right after a chunk boundary's F layer), F
    kernels.set_backend("triton")
    try:
        eng = LLMEngine.from_pretrained(model_dir(), plan, max_num_batched_tokens=64, num_blocks=8)
        assert eng.runner._plans_tiles  # the tile plan path is the one under test
        outs = eng.generate(prompts, SamplingParams(**GREEDY))
    finally:
        kernels.set_backend("auto")
    assert [o.token_ids for o in outs] == reference("glm_moe_dsa", plan)
    assert eng.block_manager.num_free == eng.block_manager.num_blocks
    assert eng.runner.tables.num_rows_in_use == 0
