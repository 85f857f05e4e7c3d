"""Cross-layer top-k overlap."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from model.calibration import topk_overlap
from model.calibration.overlap import pair_overlap
from tests.calibration.helpers import random_ids


def test_pair_overlap_counts_set_intersections():
    g = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(50)])
    b = torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(50)])
    want = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True)]
    assert pair_overlap(a.sort(-1).values, b).tolist() == want
    assert pair_overlap(a.sort(-1).values, a).tolist() == [8] * 50


def test_overlap_matrix(tiny_dir):
    model = load_model(tiny_dir("dsa_llama", index_topk=4), dtype=torch.float32)
    ids = random_ids(3, 20, seed=10)
    ov = topk_overlap(model, list(ids.split(2)), progress=False)
    m = torch.tensor(ov["overlap"], dtype=torch.float64)
    assert m.shape == (4, 4) and ov["rows"] == 3 * (20 - 4)
    torch.testing.assert_close(m.diagonal(), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(m, m.T)
    off = m[~torch.eye(4, dtype=torch.bool)]
    assert bool((off >= 0).all() and (off < 1).all())
    assert ov["adjacent"] == [ov["overlap"][i][i + 1] for i in range(3)]


def test_overlap_needs_sequences_longer_than_topk(tiny_dir):
    model = load_model(tiny_dir("dsa_llama", index_topk=4), dtype=torch.float32)
    with pytest.raises(ValueError, match="index_topk=4"):
        topk_overlap(model, [random_ids(1, 4)], progress=False)
