"""benchmarks/e2e.py --quick: the tiny shape through every stage (prefill with indexer timing,
paired decode on one shared pool, chunk sweep), results JSON and plot."""

from __future__ import annotations

import json

import pytest

from benchmarks.e2e import SEARCHED_47, main, plans_for


def test_searched_plan_is_the_papers():
    plans = plans_for(47, quick=False)
    assert len(SEARCHED_47) == 47 and SEARCHED_47.count("F") == 12 and SEARCHED_47[0] == "F"
    assert plans["uniform-1/4"].count("F") == 12


@pytest.mark.slow
def test_e2e_quick(tmp_path):
    out = tmp_path / "e2e.json"
    report = main(
        [
            "--quick",
            "--contexts",
            "80",
            "--batches",
            "1",
            "2",
            "--rounds",
            "2",
            "--chunks",
            "64",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert out.with_suffix(".png").stat().st_size > 0
    plans = set(report["plans"])
    assert {r["plan"] for r in report["prefill"]} == plans
    assert all(0 < r["indexer_share"] < 1 for r in report["prefill"])
    decode = [r for r in report["decode"] if "plan" in r]
    assert {(r["plan"], r["batch"]) for r in decode} == {(p, b) for p in plans for b in (1, 2)}
    assert all(r["tok_s"] > 0 and "kernels" in r for r in decode)
    assert all(r["all_f_over_plan"] == 1.0 for r in decode if r["plan"] == "all-F")
    assert report["chunk_sweep"] and report["chunk_sweep"][0]["chunk"] == 64
