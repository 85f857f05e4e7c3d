"""A third app, disaggregated, with what the two shared apps do not use:
- the prefill pool scaled by our policy: replica signals (record_autoscaling_stats) -> Serve's
  controller -> autoscale.ray_policy -> a second replica;
- KV payloads over Ray Direct Transport (NIXL over UCX, on CPU) between real replicas;
- an ingress limit of one request in flight (429 for the second).
"""

from __future__ import annotations

import httpx
import pytest

from tests.serving.harness import metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray


def prefill_replicas(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications[app_name]
    return app.deployments["PrefillServer"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def scale_app(ray_cluster, tiny_model):
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running
    from serving.config import ServingConfig

    small = {"num_cpus": 0.25, "engine": {"max_num_seqs": 4}}
    cfg = ServingConfig(
        model=tiny_model,
        served_model_name="tiny-scale",
        mode="disaggregated",
        app_name="app-autoscale",
        decode=small,
        ingress={"route_prefix": "/scale", "num_cpus": 0.1, "max_concurrent_requests": 1},
        prefill={
            **small,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_prefill_latency_s": 1e-4,
                "upscale_cooldown_s": 0,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2,
            },
        },
        kv_transfer={"backend": "direct", "tensor_transport": "nixl"},
        plans={"version": "checkpoint"},
        metrics_interval_s=0.5,
    )
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/scale", blocking=False)
    try:
        wait_running(cfg.app_name, 180)
        yield cfg, f"http://127.0.0.1:{ray_cluster}/scale"
    finally:
        serve.delete(cfg.app_name)


def complete(base: str, **kw) -> httpx.Response:
    body = {
        "model": "tiny-scale",
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 0,
        **kw,
    }
    return httpx.post(base + "/v1/completions", json=body, timeout=60)


def test_direct_transport_then_prefill_scale_up(scale_app, offline_engine):
    from serving.engine import SamplingParams

    cfg, base = scale_app
    assert prefill_replicas(cfg.app_name) == 1
    r = complete(base)
    assert r.status_code == 200, r.text
    ref = offline_engine.generate(
        ["Once upon a time"], SamplingParams(max_tokens=8, temperature=0)
    )[0]
    assert r.json()["choices"][0]["text"] == ref.text  # the payload crossed intact
    wait_for(
        lambda: metric_sum(scrape(base + "/metrics"), "indexcache_kv_transfer_bytes_total") > 0,
        20,
        "KV bytes moved by the direct transport in the metrics",
    )
    # Any prefill now takes longer than the 0.1 ms target: the policy asks for the maximum.
    wait_for(lambda: prefill_replicas(cfg.app_name) == 2, 90, "a second prefill replica")


def test_requests_over_the_ingress_limit_get_429(scale_app):
    _, base = scale_app
    body = {
        "model": "tiny-scale",
        "prompt": "hold",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", base + "/v1/completions", json=body) as held,
    ):
        assert held.status_code == 200
        lines = held.iter_lines()  # keep it: a dropped iterator closes the response
        first = next(lines)  # the first request is streaming: one in flight
        assert "error" not in first, first
        r = complete(base)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    wait_for(
        lambda: complete(base, max_tokens=2).status_code == 200,
        20,
        "the limit to free up once the held stream is closed",
    )
