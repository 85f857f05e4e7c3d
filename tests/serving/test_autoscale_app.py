"""A prefill pool scaled by our policy inside a running app: replica signals
(record_autoscaling_stats) -> Serve's controller -> autoscale.ray_policy -> a second replica.
The app moves its KV payloads with Ray Direct Transport (NIXL over UCX on CPU), so the same run
checks the direct transport between real prefill and decode replicas."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.harness import API_KEY, metric_sum, scrape, wait_for

pytestmark = pytest.mark.ray


def prefill_replicas(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications[app_name]
    dep = app.deployments["PrefillServer"]
    return dep.replica_states.get("RUNNING", 0)


def test_prefill_pool_scales_up_on_its_latency_signal(ray_cluster, tiny_model, offline_engine):
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
        kv_transfer={"backend": "direct", "tensor_transport": "nixl"},
        plans={"version": "checkpoint"}, metrics_interval_s=0.5)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/scale", blocking=False)
    try:
        wait_running(cfg.app_name, 180)
        assert prefill_replicas(cfg.app_name) == 1
        r = httpx.post(f"http://127.0.0.1:{ray_cluster}/scale/v1/completions", timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny-scale", "prompt": "Once upon a time",
                             "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        from serving.engine import SamplingParams

        ref = offline_engine.generate(["Once upon a time"],
                                      SamplingParams(max_tokens=8, temperature=0))[0]
        assert r.json()["choices"][0]["text"] == ref.text  # the payload crossed intact
        wait_for(lambda: metric_sum(scrape(f"http://127.0.0.1:{ray_cluster}/scale/metrics"),
                                    "indexcache_kv_transfer_bytes_total") > 0, 20,
                 "KV bytes moved by the direct transport in the metrics")
        # Any prefill now takes longer than the 0.1 ms target: the policy asks for the maximum.
        wait_for(lambda: prefill_replicas(cfg.app_name) == 2, 90, "a second prefill replica")
    finally:
        serve.delete(cfg.app_name)
