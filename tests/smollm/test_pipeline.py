"""The GPU study's driver runs its training, distillation, overlap and evaluation stages end to end
on CPU at toy sizes (real SmolLM2 weights, real data layout), so a GPU run does not die on a bug."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from benchmarks.quality import pipeline
from model.calibration.plan_file import write_plan
from model.index_cache import IndexCacheConfig


def _data(tmp_path, rng):
    d = tmp_path / "data"
    d.mkdir()
    for split, docs in (("train", 3), ("calib", 2), ("heldout", 2)):
        toks = rng.integers(100, 20000, size=docs * 400).astype(np.uint16)
        np.save(d / f"{split}.npy", toks)
        np.save(d / f"{split}_offsets.npy", np.arange(0, docs * 400 + 1, 400))
    return d


@pytest.mark.slow
def test_pipeline_stages_on_cpu(tmp_path):
    data = _data(tmp_path, np.random.default_rng(0))
    work, out = tmp_path / "work", tmp_path / "out"
    common = [
        "--data",
        str(data),
        "--work",
        str(work),
        "--out",
        str(out),
        "--index-topk",
        "32",
        "--warmup-seq",
        "96",
        "--warmup-batch",
        "1",
        "--calib-seqs",
        "1",
        "--calib-seq",
        "64",
        "--lengths",
        "96",
        "--windows",
        "1",
        "--needles",
        "0",
    ]
    assert pipeline.main(common + ["--stages", "convert", "warmup", "--warmup-steps", "2"]) == 0
    # the search itself is covered by tests/calibration; give the later stages its output
    (work / "plans").mkdir()
    for n in (2, 4, 8):
        plan = IndexCacheConfig.from_freq(30, n, 1)
        write_plan(work / "plans" / f"searched-1of{n}.json", plan, {"source": "test"})
    assert (
        pipeline.main(common + ["--stages", "distill", "overlap", "eval", "--distill-steps", "2"])
        == 0
    )
    record = json.loads((work / "record.json").read_text())
    assert record["warmup"]["steps"] == 2 and record["distill"]["steps"] == 2
    assert record["distill"]["pattern"] == IndexCacheConfig.from_freq(30, 4, 1).pattern
    rows = json.loads((work / "eval.json").read_text())
    assert {r["plan"] for r in rows} >= {"dense", "all-F", "searched-1of4", "ta-uniform-1/4"}
    assert (out / "indexers-all-F.safetensors").is_file()
    assert (out / "indexers-ta-1of4.safetensors").is_file()
    with tarfile.open(out / "results.tar.gz") as t:
        names = {n.lstrip("./") for n in t.getnames()}
    assert {"record.json", "eval.json", "overlap.json", "overlap-heatmap.png"} <= names
