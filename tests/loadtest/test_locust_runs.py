"""`indexcache loadtest` end to end: real Locust (a subprocess) against the real app on the
session's Ray cluster, tiny model, a KV pool of 16 pages (1024 tokens)."""

from __future__ import annotations

import csv
import json

import pytest

from serving.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]
NUM_BLOCKS = 16
API_KEY = "sk-loadtest"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_dir):
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running
    from serving.config import ServingConfig

    cfg = ServingConfig(
        model=tiny_dir("glm_moe_dsa"),
        served_model_name="tiny-loadtest",
        app_name="app-load",
        unified={
            "num_cpus": 0.5,
            "engine": {"num_blocks": NUM_BLOCKS, "max_num_seqs": 16, "max_num_batched_tokens": 256},
        },
        ingress={"route_prefix": "/load", "num_cpus": 0.25, "api_keys": [API_KEY]},
        metrics_interval_s=0.5,
    )
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/load", blocking=False)
    wait_running(cfg.app_name, 180)
    yield f"http://127.0.0.1:{ray_cluster}/load"
    serve.delete(cfg.app_name)  # frees its CPUs for the suites that run after this one


def loadtest(host, out, scenario, duration, *extra) -> int:
    return main(
        [
            "loadtest",
            "--host",
            host,
            "--scenario",
            scenario,
            "--duration",
            str(duration),
            "--out",
            str(out),
            "--api-key",
            API_KEY,
            "--quiet",
            *extra,
        ]
    )


def locust_rows(out) -> dict[tuple[str, str], dict]:
    with open(out / "locust_stats.csv", newline="") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def test_smoke_20s(server, tmp_path):
    out = tmp_path / "smoke"
    assert loadtest(server, out, "smoke", 20, "--slo-ttft-ms", "5000") == 0
    rows = locust_rows(out)
    ttft, post = rows[("TTFT", "chat")], rows[("POST", "chat")]
    assert int(ttft["Request Count"]) == int(post["Request Count"]) > 10
    assert int(rows[("ITL", "chat")]["Request Count"]) > 10 * int(ttft["Request Count"])
    assert rows[("", "Aggregated")]["Failure Count"] == "0"
    for f in ("report.md", "summary.json", "latency.png", "kv.png", "metrics.csv"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    req = s["requests"]
    assert req["failed"] == req["lost"] == 0 and req["completed"] == req["sent"] > 10
    # Exactly max_tokens (ignore_eos) per request, counted by the server's usage chunk.
    assert s["overall"]["output_tokens"] == 32 * req["completed"]
    assert s["server_requests_finished"] == req["completed"]


def test_saturate_holds_the_pool_full_and_loses_nothing(server, tmp_path):
    out = tmp_path / "saturate"
    rc = loadtest(server, out, "saturate", 28)
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0, (s["requests"], s["kv"], s["drain"])
    assert s["kv_capacity_tokens"] == NUM_BLOCKS * 64
    kv, req = s["kv"], s["requests"]
    assert kv["max"] >= 0.9 and kv["saturated"]["p50"] >= 0.9
    # More users than the pool holds: requests queued (waiting) or were preempted ...
    assert s["stages"][-1]["users"] > s["requests_fit"]
    assert kv["waiting_max"] > 0 or kv["preemptions"] > 0
    # ... and still every one completed, on the client and on the server.
    assert req["failed"] == req["lost"] == 0 and req["completed"] == req["sent"] > 0
    assert s["server_requests_finished"] == req["completed"] == s["locust_posts"]
    # The pool is empty again after the load.
    assert s["drain"]["idle"] and s["drain"]["last_sample"]["kv_usage"] == 0


def test_multiturn_reports_prefix_hits_and_follow_up_ttft(server, tmp_path):
    out = tmp_path / "multiturn"
    args = ("--users", "2", "--turns", "3", "--doc-tokens", "300", "--max-tokens", "8")
    rc = loadtest(server, out, "multiturn", 15, *args)
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0, (s["requests"], s["drain"])
    assert s["by_workload"]["turn1"]["completed"] > 0
    assert s["by_workload"]["followup"]["completed"] > 0
    # follow-ups resend their history: the server's prefix cache serves a good share of it
    assert s["prefix_cache"]["hit_rate"] > 0.2, s["prefix_cache"]
    assert "prefix cache:" in (out / "report.md").read_text()
