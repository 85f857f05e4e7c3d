"""Greedy layer search: dead layers first, cached prefix == naive, plans evaluated on the all-F
model equal models built with the plan, pipeline blocks, retention arithmetic."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from model.calibration import PlanEvaluator, greedy_search
from model.calibration.search import block_quotas, split_blocks, target_full_layers
from model.tiny import KINDS
from tests.calibration.helpers import dead_layer_model, random_ids, sample_from

DEAD = [2, 4]


@pytest.fixture(scope="module")
def dead_setup(tiny_dir):
    path = tiny_dir("dsa_llama", num_hidden_layers=6, index_topk=4, tie_word_embeddings=False)
    model = dead_layer_model(path, DEAD)
    return model, sample_from(model, 8, 48, seed=0)


def test_dead_layers_are_flipped_first_with_zero_delta(dead_setup):
    model, ids = dead_setup
    r = greedy_search(model, list(ids.split(4)), retain=1 / 6, progress=False)
    assert [s.flipped for s in r.steps[: len(DEAD)]] == [[l] for l in sorted(DEAD)]
    for s in r.steps[: len(DEAD)]:
        assert s.delta == 0.0 and s.loss == r.base_loss
    # Every layer whose choice matters costs loss when flipped, at every step it is a candidate
    # while the dead layers are still being flipped, and is only flipped afterwards.
    alive = [l for l in range(1, 6) if l not in DEAD]
    for s in r.steps[: len(DEAD)]:
        assert all(s.candidates[l] > s.loss_before + 1e-2 for l in alive), s.candidates
    assert sorted(l for s in r.steps[len(DEAD) :] for l in s.flipped) == alive
    assert r.plan.pattern.count("F") == 1 and r.plan.source == "calibration"


@pytest.mark.parametrize("kind,blocks", [("dsa_llama", 1), ("glm_moe_dsa", 1), ("dsa_llama", 2)])
def test_cached_prefix_equals_naive(tiny_dir, kind, blocks):
    model = load_model(tiny_dir(kind, num_hidden_layers=6, index_topk=4), dtype=torch.float32)
    batches = list(random_ids(4, 40, seed=1).split(2))
    fast = greedy_search(model, batches, 1 / 3, pipeline_blocks=blocks, progress=False)
    slow = greedy_search(
        model, batches, 1 / 3, pipeline_blocks=blocks, reuse_prefix=False, progress=False
    )
    assert fast.plan == slow.plan
    assert fast.base_loss == pytest.approx(slow.base_loss, abs=1e-6)
    for a, b in zip(fast.steps, slow.steps, strict=True):
        assert a.flipped == b.flipped and a.pattern == b.pattern
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
        assert a.candidates.keys() == b.candidates.keys()
        for l in a.candidates:
            assert a.candidates[l] == pytest.approx(b.candidates[l], abs=1e-6)
    assert fast.layer_forwards < slow.layer_forwards == slow.naive_layer_forwards
    # The recorded loss of each committed plan is that plan's loss from scratch.
    ev = PlanEvaluator(model, batches)
    for s in fast.steps:
        assert s.loss == pytest.approx(ev.loss(s.pattern), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_on_all_f_model_equals_model_built_with_plan(tiny_dir, kind):
    path = tiny_dir(kind, index_topk=4)
    full = load_model(path, dtype=torch.float32)
    ids = random_ids(2, 40, seed=2)
    ev = PlanEvaluator(full, [ids])
    dense = ev.logits(ids, "FFFF")
    torch.testing.assert_close(dense, full(ids), rtol=0, atol=0)
    for pattern in ("FSFS", "FFSS", "FSSS"):
        built = load_model(path, pattern, dtype=torch.float32)
        got = ev.logits(ids, pattern)
        torch.testing.assert_close(got, built(ids), rtol=1e-6, atol=1e-6)
        assert (got - dense).abs().max() > 1e-4  # the plan really changes the computation


def test_plan_at_reads_every_retention_off_the_trajectory(dead_setup):
    model, ids = dead_setup
    r = greedy_search(model, [ids[:4]], retain=0.5, progress=False)
    assert r.plan_at(6).pattern == "FFFFFF"
    assert r.plan_at(3) == r.plan
    assert r.plan_at(4).pattern == r.steps[1].pattern
    with pytest.raises(ValueError, match="no plan with 2"):
        r.plan_at(2)
    d = r.to_dict()
    assert d["candidate_evals"] == 5 + 4 + 3 and d["candidate_evals_per_s"] > 0
    assert [s["flipped"] for s in d["steps"]] == [s.flipped for s in r.steps]


def test_pipeline_blocks_keep_block_heads_full(tiny_dir):
    model = load_model(
        tiny_dir("dsa_llama", num_hidden_layers=6, index_topk=4), dtype=torch.float32
    )
    r = greedy_search(model, [random_ids(2, 40, seed=3)], 1 / 3, pipeline_blocks=2, progress=False)
    assert r.blocks == [(0, 3), (3, 6)]
    assert r.plan.pattern[0] == "F" and r.plan.pattern[3] == "F"
    assert r.plan.pattern.count("F") == 2
    assert all(len(s.flipped) == 2 for s in r.steps)  # one flip per block per step
    assert all(s.loss == s.loss for s in r.steps)  # multi-flip losses are filled in (not NaN)


def test_retain_one_is_all_full(tiny_dir):
    model = load_model(tiny_dir("dsa_llama", index_topk=4), dtype=torch.float32)
    r = greedy_search(model, [random_ids(1, 24)], 1.0, progress=False)
    assert r.plan.pattern == "FFFF" and r.steps == [] and r.final_loss == r.base_loss


def test_retention_arithmetic():
    assert target_full_layers(47, 0.25) == 12 and target_full_layers(47, 0.5) == 24  # paper
    assert target_full_layers(4, 1 / 8) == 1
    assert split_blocks(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert block_quotas([(0, 3), (3, 5), (5, 7)], 4) == [2, 1, 1]
    assert sum(block_quotas(split_blocks(47, 4), 12)) == 12


@pytest.mark.parametrize("retain", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_retain_outside_unit_interval_is_refused(retain):
    with pytest.raises(ValueError, match="retain must be in"):
        target_full_layers(8, retain)


def test_bad_block_settings_are_refused():
    with pytest.raises(ValueError, match="pipeline_blocks"):
        split_blocks(4, 5)
    with pytest.raises(ValueError, match="pipeline blocks"):
        target_full_layers(8, 0.25, fixed=4)


def test_search_needs_an_all_full_model(tiny_dir):
    model = load_model(tiny_dir("dsa_llama", index_topk=4), "FSFF", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"layers \[1\] have none"):
        greedy_search(model, [random_ids(1, 24)], 0.5, progress=False)
