"""IndexCache plan resolution: goldens equal transformers' `indexer_types`; bad plans refused."""

from __future__ import annotations

import pytest

from model import IndexCacheConfig

GOLDEN = [  # (num_layers, config fields)
    (8, dict(index_topk_freq=1)),
    (8, dict(index_topk_freq=2)),
    (9, dict(index_topk_freq=3)),
    (10, dict(index_topk_freq=4, index_skip_topk_offset=3)),  # GLM-5.2 IndexShare style
    (7, dict(index_topk_freq=2, index_skip_topk_offset=5)),
    (7, dict(index_topk_freq=3, index_skip_topk_offset=1)),
    (6, dict(index_topk_pattern="FSSFSF")),
    (5, dict(indexer_types=["full", "shared", "full", "shared", "shared"])),
    (5, dict(indexer_types=["full", "full", "shared", "full", "shared"], index_topk_freq=3)),
    (78, dict(index_topk_freq=4, index_skip_topk_offset=3)),
]


@pytest.mark.parametrize("n,fields", GOLDEN, ids=[f"L{n}-{sorted(f)}" for n, f in GOLDEN])
def test_plan_equals_transformers(n, fields):
    from transformers import GlmMoeDsaConfig

    hf = GlmMoeDsaConfig(num_hidden_layers=n, **fields)
    ours = IndexCacheConfig.from_hf(fields, n)
    assert ours.indexer_types == list(hf.indexer_types)


def test_glm52_indexshare_layers():
    plan = IndexCacheConfig.from_freq(78, 4, 3)
    assert plan.full_layers[:5] == (0, 1, 2, 6, 10) and len(plan.full_layers) == 21


def test_queries():
    plan = IndexCacheConfig.from_pattern("FSSFS", 5)
    assert plan.full_layers == (0, 3) and plan.shared_layers == (1, 2, 4)
    assert [plan.source_layer(i) for i in range(5)] == [0, 0, 0, 3, 3]
    assert plan.retention == 2 / 5
    assert plan.plan_id != IndexCacheConfig.all_full(5).plan_id


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: IndexCacheConfig.from_pattern("FSF", 4), "length 3"),
        (lambda: IndexCacheConfig.from_pattern("FSXF", 4), "only contain 'F' and 'S'"),
        (lambda: IndexCacheConfig.from_pattern("SFFF", 4), "must start with 'F'"),
        (lambda: IndexCacheConfig.from_freq(4, 0), "index_topk_freq"),
        (
            lambda: IndexCacheConfig.from_freq(4, 2, 0),
            "must start with 'F'",
        ),  # transformers allows it
        (lambda: IndexCacheConfig.from_indexer_types(["full", "partial"], 2), "indexer_types"),
        (lambda: IndexCacheConfig.from_indexer_types(["full"], 2), "length 1"),
        (lambda: IndexCacheConfig.coerce(3, 4, IndexCacheConfig.all_full(4)), "index_cache"),
    ],
)
def test_bad_plans_name_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()
