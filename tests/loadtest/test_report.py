"""report.py on a hand-made run directory: percentiles, goodput under SLOs, the none-lost and
drained verdict, and the files it writes."""

from __future__ import annotations

import csv
import json

import pytest

from loadtest.report import Run, summarize, write_report
from loadtest.slo import SLO
from serving.cli.loadtest import verdict

T0 = 1000.0


def make_run(d, *, lost=0, idle=True, kv=(0.5, 0.95, 1.0, 0.92, 0.0)):
    reqs = []
    for i in range(10):  # ttft 100..1000 ms, tpot 10 ms (19 ms for the last), 20 tokens
        tpot = 0.019 if i == 9 else 0.010
        ttft = 0.1 * (i + 1)
        reqs.append(
            {
                "workload": "docs" if i % 2 else "chat",
                "start": T0 + i,
                "ttft_s": ttft,
                "tpot_s": tpot,
                "e2e_s": ttft + 19 * tpot,
                "prompt_tokens": 50,
                "output_tokens": 20,
                "itl_ms": [tpot * 1000] * 19,
            }
        )
    reqs.append(
        {"workload": "chat", "start": T0 + 3, "e2e_s": 0.2, "error": "HTTP 503: overloaded"}
    )
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    rows = [
        {
            "t": T0 + i * 5,
            "kv_usage": u,
            "kv_capacity_tokens": 1024,
            "kv_capacity_per_replica": 1024,
            "running": 4 * u,
            "waiting": 1,
            "preemptions": i,
            "generation_tokens": 100 * i,
            "requests_finished": 2 * i,
        }
        for i, u in enumerate(kv)
    ]
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plan = {
        "scenario": "saturate",
        "stages": [{"until_s": 10, "users": 4}, {"until_s": 20, "users": 6}],
        "saturated_from_s": 4.0,
        "requests_fit": 4.0,
        "workload": {"kind": "mix", "max_tokens": 20, "doc_tokens": [40, 80]},
    }
    meta = {
        "host": "h",
        "model": "m",
        "max_model_len": 4096,
        "kv_capacity_tokens": 1024,
        "plan": plan,
        "load_started": T0,
        "load_stopped": T0 + 20,
        "requests": {"sent": 11 + lost, "completed": 10, "failed": 1, "lost": lost},
        "drain": {"idle": idle, "seconds": 1.0, "last_sample": rows[-1]},
    }
    (d / "run.json").write_text(json.dumps(meta))
    return d


def test_summary_numbers(tmp_path):
    s = summarize(Run.load(make_run(tmp_path)), SLO(ttft_ms=500, itl_ms=15))
    o = s["overall"]
    assert (o["requests"], o["completed"], o["failed"]) == (11, 10, 1)
    assert o["ttft_ms"]["p50"] == pytest.approx(550)  # median of 100..1000
    assert o["itl_ms"]["p50"] == pytest.approx(10)
    # TTFT <= 500 ms: requests 0..4; all of them have TPOT 10 ms <= 15.
    assert o["good_requests"] == 5 and o["good_fraction"] == pytest.approx(5 / 11)
    assert o["goodput_rps"] == pytest.approx(5 / 20)
    assert o["output_tokens_per_s"] == pytest.approx(200 / 20)
    assert set(s["by_workload"]) == {"chat", "docs"}
    assert s["errors"] == {"HTTP 503: overloaded": 1}
    # Saturated stage: samples from t0+4 on (0.95, 1.0, 0.92, 0.0 at t0+20).
    sat = s["kv"]["saturated"]
    assert sat["samples"] == 4 and sat["p50"] == pytest.approx(0.935)
    assert s["kv"]["preemptions"] == 4 and s["server_requests_finished"] == 8
    # SLOs not given: every completed request counts.
    assert summarize(Run.load(tmp_path), SLO())["overall"]["good_requests"] == 10
    with pytest.raises(ValueError, match="ttft_ms"):
        SLO(ttft_ms=-1)


def test_verdict_names_each_problem(tmp_path):
    s = summarize(Run.load(make_run(tmp_path)), SLO())
    assert verdict(s) == ["1 requests failed"]
    bad = summarize(
        Run.load(make_run(tmp_path, lost=2, idle=False, kv=(0.5, 0.5, 0.6, 0.0))), SLO()
    )
    problems = " | ".join(verdict(bad))
    assert "2 requests were in flight" in problems and "did not return to zero" in problems
    assert "median" in problems  # KV never held >= 0.9 in the oversubscribed stage


def test_write_report_files(tmp_path):
    write_report(make_run(tmp_path), SLO(e2e_ms=1000))
    md = (tmp_path / "report.md").read_text()
    assert "| all | 10/11 |" in md and "E2E <= 1000 ms" in md
    assert "HTTP 503: overloaded" in md
    for png in ("latency.png", "kv.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "summary.json").read_text())["requests"]["sent"] == 11
    with pytest.raises(FileNotFoundError, match="run.json"):
        Run.load(tmp_path / "nowhere")
