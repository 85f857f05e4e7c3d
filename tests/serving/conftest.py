"""Both application modes deployed side by side (unified at /unified, disaggregated at /disagg)
on the real engine and a tiny model, in the session's one Ray cluster (`ray_cluster`, defined in
tests/conftest.py so that every suite shares it).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.serving.harness import API_KEY


@dataclass(frozen=True)
class App:
    mode: str
    name: str  # Serve application name
    model: str  # served model name
    base_url: str  # http://127.0.0.1:PORT/prefix
    config: object  # ServingConfig

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def metrics_url(self) -> str:
        return self.base_url + "/metrics"


def _config(model_dir: str, mode: str):
    from serving.config import ServingConfig

    group = {"num_cpus": 0.5, "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 256}}
    return ServingConfig(
        model=model_dir,
        served_model_name=f"tiny-{mode}",
        mode=mode,
        app_name=f"app-{mode}",
        unified=group,
        prefill=group,
        decode=group,
        ingress={
            "route_prefix": f"/{mode}",
            "num_cpus": 0.25,
            "api_keys": [API_KEY],
            "max_prompt_tokens": 1024,
            "max_tokens_limit": 4000,
            "max_body_bytes": 65536,
        },
        kv_transfer={"timeout_s": 20},
        plans={"version": "latest", "poll_interval_s": 0.5},
        metrics_interval_s=0.5,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return tiny_dir("glm_moe_dsa")


@pytest.fixture(scope="session")
def apps(ray_cluster, tiny_model) -> dict[str, App]:
    from ray import serve

    from serving.app import build_app
    from serving.cli.serve import wait_running

    out = {}
    for mode in ("unified", "disaggregated"):
        cfg = _config(tiny_model, mode)
        serve.run(
            build_app(cfg), name=cfg.app_name, route_prefix=cfg.ingress.route_prefix, blocking=False
        )  # both deploy at once
        out[mode] = App(
            mode,
            cfg.app_name,
            cfg.model_name,
            f"http://127.0.0.1:{ray_cluster}{cfg.ingress.route_prefix}",
            cfg,
        )
    for app in out.values():
        wait_running(app.name, 180)
    return out


@pytest.fixture(params=["unified", "disaggregated"])
def app(request, apps) -> App:
    return apps[request.param]


@pytest.fixture(scope="session")
def offline_engine(tiny_model):
    """The engine's offline `generate` on the same checkpoint: the reference for greedy output."""
    from serving.engine import LLMEngine

    return LLMEngine.from_pretrained(tiny_model)
