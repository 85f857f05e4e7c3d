"""Indexer distillation: only indexers train, the loss falls, chunking is exact, checkpoints resume
bit-for-bit, exports load with their plan."""

from __future__ import annotations

import json

import pytest
import torch

from model import IndexCacheConfig, load_model
from model.calibration import DistillConfig, IndexerDistiller, export_checkpoint
from model.calibration.distill import served_layers
from tests.calibration.helpers import random_ids

PLAN = "FSSF"


@pytest.fixture(scope="module")
def glm(tiny_dir):
    return tiny_dir("glm_moe_dsa", index_topk=4)


def _trainer(path, steps, **kw):
    model = load_model(path, PLAN, dtype=torch.float32)
    return model, IndexerDistiller(model, DistillConfig(steps=steps, lr=1e-2, **kw))


def test_served_layers():
    plan = IndexCacheConfig.from_pattern("FSSFS", 5)
    assert served_layers(plan) == {0: [0, 1, 2], 3: [3, 4]}
    assert served_layers(plan, "single") == {0: [0], 3: [3]}


def test_training_lowers_the_loss_and_touches_only_indexers(glm):
    model, tr = _trainer(glm, steps=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(tr.params) == {n for n in before if ".self_attn.indexer." in n}
    assert not any(
        n.startswith(("model.layers.1.", "model.layers.2.")) for n in tr.params
    )  # S layers own no indexer
    batches = [random_ids(2, 24, seed=6)]
    start, per_layer = tr.batch_loss(batches[0], backward=False)
    assert set(per_layer) == {0, 3}
    tr.train(batches, progress=False)
    end, _ = tr.batch_loss(batches[0], backward=False)
    assert end < 0.9 * start, (start, end)
    for n, p in model.named_parameters():
        if n in tr.params:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_chunking_does_not_change_loss_or_gradients(glm):
    ids = random_ids(2, 24, seed=7)
    grads = []
    for chunk in (256, 5):
        model, tr = _trainer(glm, steps=1, chunk=chunk)
        loss, _ = tr.batch_loss(ids)
        grads.append((loss, {n: p.grad.clone() for n, p in tr.params.items()}))
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-8)


def test_checkpoint_resume_matches_uninterrupted_run(glm, tmp_path):
    batches = list(random_ids(4, 24, seed=8).split(2))
    _, straight = _trainer(glm, steps=4)
    straight.train(batches, progress=False)

    _, first = _trainer(glm, steps=2)
    first.train(batches, tmp_path, progress=False, meta={"calibration_data_hash": "x"})
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 2 and state["pattern"] == PLAN and state["calibration_data_hash"] == "x"
    _, resumed = _trainer(glm, steps=4)
    resumed.load(tmp_path)
    assert resumed.step == 2 and len(resumed.history) == 2
    resumed.train(batches, progress=False)
    for n, p in straight.params.items():
        torch.testing.assert_close(resumed.params[n], p, rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_resume_refuses_another_plan(glm, tmp_path):
    _, tr = _trainer(glm, steps=1)
    tr.train([random_ids(1, 24)], tmp_path, progress=False)
    other = load_model(glm, "FSFS", dtype=torch.float32)
    with pytest.raises(ValueError, match="plan"):
        IndexerDistiller(other, DistillConfig(steps=2)).load(tmp_path)
    with pytest.raises(ValueError, match="has no"):
        tr.load(tmp_path / "missing")


def test_export_writes_a_servable_checkpoint(glm, tmp_path):
    model, tr = _trainer(glm, steps=2)
    ids = random_ids(1, 24, seed=9)
    tr.train([ids], progress=False)
    out = export_checkpoint(model, glm, tmp_path / "export")
    back = load_model(out, dtype=torch.float32)  # the plan now comes from config.json
    assert back.plan.pattern == PLAN
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "field,kw",
    [
        ("loss", {"loss": "avg"}),
        ("steps", {"steps": 0}),
        ("lr", {"lr": 0.0}),
        ("chunk", {"chunk": -1}),
    ],
)
def test_bad_config_names_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**kw)
