"""A tensor-parallel replica through Ray Serve on CPU bundles: one replica owns a placement
group of two bundles, is rank 0 itself and starts rank 1 as an actor; the official openai
client gets the single-process engine's greedy text. A published plan cannot be built beside the
running engine (one process group per process): the replica reports it as its plan_error and
keeps serving its plan. Killing rank 1 fails the replica cleanly: /health answers 503 and
requests get 503 (not a hang) until Serve replaces it."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.harness import API_KEY, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
NAME = "app-tp"


def _config(model_dir: str):
    from serving.config import ServingConfig

    return ServingConfig(
        model=model_dir,
        served_model_name="tiny-tp",
        app_name=NAME,
        unified={
            "num_cpus": 0.25,  # per rank: one bundle each
            "engine": {
                "max_num_seqs": 4,
                "max_num_batched_tokens": 256,
                "tensor_parallel_size": 2,
                "expert_parallel": True,
            },
        },
        ingress={"route_prefix": "/tp", "num_cpus": 0.1, "api_keys": [API_KEY]},
        plans={"version": "latest", "poll_interval_s": 0.5},
    )


def test_tp2_replica_serves_then_fails_cleanly(ray_cluster, tiny_dir):
    import ray
    from ray import serve

    from serving import plan_registry
    from serving.app import build_app, deployment_options
    from serving.cli.serve import wait_running
    from serving.engine import LLMEngine, SamplingParams

    model_dir = tiny_dir("glm_moe_dsa")
    cfg = _config(model_dir)
    opts = deployment_options(cfg, "unified")
    assert opts["placement_group_bundles"] == [{"CPU": 0.25}] * 2
    base = f"http://127.0.0.1:{ray_cluster}/tp"
    serve.run(build_app(cfg), name=NAME, route_prefix="/tp", blocking=False)
    try:
        wait_running(NAME, 240)
        client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        prompt = "Once upon a time"
        want = LLMEngine.from_pretrained(model_dir).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=10)
        )[0]
        r = client.completions.create(model="tiny-tp", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == want.text
        health = httpx.get(base + "/health", timeout=30).json()
        (ranks,) = [e["tp_ranks"] for e in health["engines"]]
        assert len(ranks) == 1, health

        def plan_error():
            (engine,) = httpx.get(base + "/health", timeout=30).json()["engines"]
            return engine["plan_error"] or ""

        plan_registry.publish("tiny-tp", "FSSF", {"source": "pattern"})
        wait_for(lambda: "already runs an engine" in plan_error(), 60, "the plan to be refused")
        r = client.completions.create(model="tiny-tp", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == want.text  # still the checkpoint's plan

        ray.kill(ray.get_actor(ranks[0]["name"], namespace=ranks[0]["namespace"]))
        wait_for(
            lambda: httpx.get(base + "/health", timeout=30).status_code == 503,
            60,
            "/health to answer 503 after a rank died",
        )
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny-tp", prompt=prompt, max_tokens=4)
        assert err.value.status_code == 503, err.value
    finally:
        serve.delete(NAME)
