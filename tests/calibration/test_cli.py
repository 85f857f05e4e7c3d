"""`indexcache calibrate` and `indexcache distill` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch

from model import IndexCacheConfig, load_model
from model.calibration import read_plan
from serving.cli import main

WORDS = (
    "sparse attention keeps the top k keys of every query while the lightning indexer "
    "scores all earlier tokens and shared layers reuse those indices"
).split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    f = tmp_path_factory.mktemp("data") / "corpus.txt"
    f.write_text(" ".join(rng.choice(WORDS) for _ in range(900)))  # ~6 KB
    return f


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("dsa_llama", index_topk=8)


def _calibrate(model_dir, data, out, *extra):
    return main(
        [
            "calibrate",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--retain",
            "0.5",
            "--seq-len",
            "32",
            "--num-seqs",
            "4",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_calibrate_end_to_end(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cal"
    assert _calibrate(model_dir, text_file, out) == 0
    assert "plan F" in capsys.readouterr().out
    for name in ("plan.json", "trajectory.json", "search_curve.png", "overlap.json", "overlap.png"):
        assert (out / name).stat().st_size > 0, name
    plan = read_plan(out / "plan.json", 4)
    assert plan.source == "calibration" and plan.retention == 0.5
    doc = json.loads((out / "plan.json").read_text())
    assert IndexCacheConfig.from_pattern(doc["index_topk_pattern"], 4) == IndexCacheConfig(
        plan.pattern, "pattern"
    )
    prov = doc["provenance"]
    assert prov["source"] == "calibration" and prov["seq_len"] == 32 and prov["num_seqs"] == 4
    assert len(prov["calibration_data_hash"]) == 64 and isinstance(prov["created_at"], float)
    assert [s["loss"] for s in prov["loss_trajectory"]] and prov["final_loss"] > 0
    traj = json.loads((out / "trajectory.json").read_text())
    assert traj["pattern"] == plan.pattern and len(traj["steps"]) == 2
    assert traj["candidate_evals"] == 3 + 2 and traj["candidate_evals_per_s"] > 0
    assert traj["layer_work_vs_naive"] < 1
    model = load_model(model_dir, plan, dtype=torch.float32)  # the plan loads into the model
    assert model.plan.pattern == plan.pattern
    assert [l.self_attn.indexer is None for l in model.model.layers] == [
        c == "S" for c in plan.pattern
    ]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--retain", "0"], "retain must be in"),
        (["--retain", "1.5"], "retain must be in"),
        (["--seq-len", "8"], "--seq-len 8 must be greater than the model's index_topk"),
        (["--num-seqs", "500"], "need num_seqs"),
        (["--pipeline-blocks", "9"], "pipeline_blocks"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_calibrate_bad_arguments_exit_2(model_dir, text_file, tmp_path, capsys, args, match):
    assert _calibrate(model_dir, text_file, tmp_path / "x", *args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "content,name,match",
    [
        (None, "nope.jsonl", "does not exist"),
        ("", "empty.jsonl", "no JSONL records"),
        ("{oops\n", "bad.jsonl", "bad.jsonl:1 is not valid JSON"),
    ],
)
def test_calibrate_bad_data_exit_2(model_dir, tmp_path, capsys, content, name, match):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    assert _calibrate(model_dir, f, tmp_path / "x") == 2
    assert match in capsys.readouterr().err


def test_publish_without_registry_fails_before_searching(
    model_dir, text_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "serving.plan_registry", None)  # import raises ImportError
    assert _calibrate(model_dir, text_file, tmp_path / "x", "--publish") == 2
    assert "plan registry" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_publish_calls_the_registry(model_dir, text_file, tmp_path, monkeypatch):
    calls = []

    def publish(model, plan, provenance, *, address=None, num_layers=None):
        calls.append((model, plan, provenance, address, num_layers))
        return 7

    fake = types.ModuleType("serving.plan_registry")
    fake.publish = publish
    monkeypatch.setitem(sys.modules, "serving.plan_registry", fake)
    out = tmp_path / "cal"
    assert (
        _calibrate(
            model_dir,
            text_file,
            out,
            "--publish",
            "--registry-model",
            "tiny-llama",
            "--ray-address",
            "ray://head:10001",
            "--no-overlap",
        )
        == 0
    )
    [(name, plan, prov, address, num_layers)] = calls
    assert name == "tiny-llama" and address == "ray://head:10001"
    assert num_layers == 4  # the checkpoint's layer count: the registry checks the plan with it
    assert plan == read_plan(out / "plan.json", 4) and prov["source"] == "calibration"
    assert (
        prov["calibration_data_hash"]
        == json.loads((out / "trajectory.json").read_text())["calibration_data_hash"]
    )
    doc = json.loads((out / "plan.json").read_text())
    assert doc["provenance"]["registry"] == {"model": "tiny-llama", "version": 7}
    assert not (out / "overlap.json").exists()


def test_distill_end_to_end_with_resume_and_export(model_dir, text_file, tmp_path, capsys):
    out, export = tmp_path / "ckpt", tmp_path / "served"
    base = [
        "distill",
        "--model",
        str(model_dir),
        "--data",
        str(text_file),
        "--seq-len",
        "32",
        "--num-seqs",
        "2",
        "--index-cache",
        "FSFS",
        "--out",
        str(out),
        "--quiet",
        "--lr",
        "0.01",
    ]
    assert main([*base, "--steps", "2"]) == 0
    assert json.loads((out / "state.json").read_text())["step"] == 2
    assert main([*base, "--steps", "3"]) == 2  # refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--steps", "3", "--resume", "--export", str(export)]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3 and state["pattern"] == "FSFS"
    assert (out / "loss.png").stat().st_size > 0 and (out / "indexer.safetensors").is_file()
    assert load_model(export, dtype=torch.float32).plan.pattern == "FSFS"
