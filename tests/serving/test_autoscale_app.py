"""A prefill pool scaled by our policy inside a running app: replica signals
(record_autoscaling_stats) -> Serve's controller -> autoscale.ray_policy -> a second replica."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.harness import API_KEY, wait_for

pytestmark = pytest.mark.ray


def prefill_replicas(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications[app_name]
    dep = app.deployments["PrefillServer"]
    return dep.replica_states.get("RUNNING", 0)


def test_prefill_pool_scales_up_on_its_latency_signal(ray_cluster, tiny_model):
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running
    from serving.config import ServingConfig

    small = {"num_cpus": 0.25, "engine": {"max_num_seqs": 4}}
    cfg = ServingConfig(
        model=tiny_model, served_model_name="tiny-scale", mode="disaggregated",
        app_name="app-autoscale", decode=small, ingress={"route_prefix": "/scale", "num_cpus": 0.1},
        prefill={**small, "autoscaling": {
            "min_replicas": 1, "max_replicas": 2, "target_prefill_latency_s": 1e-4,
            "upscale_cooldown_s": 0, "metrics_interval_s": 0.5, "look_back_period_s": 2}},
        plans={"version": "checkpoint"}, metrics_interval_s=0.5)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/scale", blocking=False)
    try:
        wait_running(cfg.app_name, 180)
        assert prefill_replicas(cfg.app_name) == 1
        r = httpx.post(f"http://127.0.0.1:{ray_cluster}/scale/v1/completions", timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny-scale", "prompt": "scale me", "max_tokens": 2})
        assert r.status_code == 200, r.text
        # Any prefill now takes longer than the 0.1 ms target: the policy asks for the maximum.
        wait_for(lambda: prefill_replicas(cfg.app_name) == 2, 90, "a second prefill replica")
    finally:
        serve.delete(cfg.app_name)
