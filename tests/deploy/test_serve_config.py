"""serveConfigV2 as KubeRay hands it to Ray Serve: it parses into the ServingConfig it was
rendered from, names an importable application builder whose deployments the overrides match,
equals what `indexcache render-k8s` produces now, and fits the cluster it runs on."""

from __future__ import annotations

import importlib
import json
import shlex

import pytest
import yaml

from serving.cli import render_k8s
from serving.config import ServingConfig
from tests.deploy.conftest import SERVING_YAML, TARGETS, one

RENDERED_PATCHES = {"base": SERVING_YAML["base"], "prod": SERVING_YAML["prod"]}


def serve_doc(docs) -> dict:
    return yaml.safe_load(one(docs, "RayService", "indexcache")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("target", RENDERED_PATCHES)
def test_checked_in_render_is_not_stale(target):
    config = RENDERED_PATCHES[target]
    checked_in = (config.parent / "serve-config.yaml").read_text()
    assert checked_in == render_k8s.render(config), (
        f"stale: run indexcache render-k8s {config} --out {config.parent / 'serve-config.yaml'}"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_serve_config_v2_is_its_serving_yaml(rendered, target):
    from ray.serve.schema import ServeDeploySchema

    doc = serve_doc(rendered[target])
    # What Serve's REST API parses the document into (it checks types, ignores unknown keys).
    ServeDeploySchema.model_validate(doc)
    config = ServingConfig.from_yaml(SERVING_YAML[target])
    assert doc == render_k8s.serve_config(config)
    (app,) = doc["applications"]
    assert ServingConfig.model_validate(app["args"]) == config
    assert app["name"] == config.app_name
    assert app["route_prefix"] == config.ingress.route_prefix
    assert doc["http_options"] == {"host": "0.0.0.0", "port": config.ingress.port}


@pytest.mark.parametrize("target", ["base", "prod"])
def test_import_path_builds_an_app_the_overrides_match(rendered, target):
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import Application

    (app,) = serve_doc(rendered[target])["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    built = builder(app["args"])  # what Serve calls with `args`; binds, starts nothing
    assert isinstance(built, Application)
    deployments = {d.name: d for d in build_app(built, name=app["name"]).deployments}
    for override in app["deployments"]:
        assert override["name"] in deployments, f"Serve would reject: {override['name']}"
        # A config's ray_actor_options replaces the code's whole dict: keep everything it set.
        code = deployments[override["name"]].ray_actor_options
        assert override["ray_actor_options"].items() >= code.items()


def test_render_refuses_a_loopback_proxy(tmp_path):
    cfg = tmp_path / "serving.yaml"
    cfg.write_text("model: /models/x\n")  # ingress.host defaults to 127.0.0.1
    with pytest.raises(ValueError, match="ingress.host"):
        render_k8s.render(cfg)


def test_render_cli_writes_and_rejects_unknown_fields(tmp_path, capsys):
    from serving.cli import main

    good = tmp_path / "serving.yaml"
    good.write_text("model: /models/x\ningress: {host: 0.0.0.0}\n")
    out = tmp_path / "patch.yaml"
    assert main(["render-k8s", str(good), "--out", str(out)]) == 0
    patch = yaml.safe_load(out.read_text())
    assert patch["kind"] == "RayService" and "serveConfigV2" in patch["spec"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /models/x\ningress: {host: 0.0.0.0, prot: 1}\n")
    capsys.readouterr()
    assert main(["render-k8s", str(bad)]) == 2
    assert "ingress.prot" in capsys.readouterr().err


# -- the cluster the config runs on -----------------------------------------------------------
def _gpus(container) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _cpus(container) -> float:
    return float(container["resources"]["limits"]["cpu"])


def _offered(group) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


@pytest.mark.parametrize("target", TARGETS)
def test_each_role_has_its_own_pool_with_room_for_max_replicas(rendered, target):
    rs = one(rendered[target], "RayService", "indexcache")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    config = ServingConfig.from_yaml(SERVING_YAML[target])
    (app,) = serve_doc(rendered[target])["applications"]
    pins = {d["name"]: d["ray_actor_options"]["resources"] for d in app["deployments"]}
    spare_cpus = 0.0
    for role in config.roles:
        resource = render_k8s.role_resource(role)
        assert {resource: 1} in pins.values()
        pools = [g for g in groups if resource in _offered(g)]
        assert len(pools) == 1, f"{role}: offered by {len(pools)} worker groups"
        pool, g = pools[0], config.group(role)
        most = g.autoscaling.max_replicas if g.autoscaling else g.num_replicas
        container = pool["template"]["spec"]["containers"][0]
        ranks = g.engine.tensor_parallel_size  # resources are per rank, one bundle each
        assert most * ranks * g.num_gpus <= pool["maxReplicas"] * _gpus(container), role
        assert most * ranks * g.num_cpus <= pool["maxReplicas"] * _cpus(container), role
        spare_cpus += pool["maxReplicas"] * _cpus(container) - most * ranks * g.num_cpus
    assert config.ingress.num_replicas * config.ingress.num_cpus <= spare_cpus


@pytest.mark.parametrize("target", TARGETS)
def test_probes_and_scrapes_follow_the_ingress(rendered, target):
    config = ServingConfig.from_yaml(SERVING_YAML[target])
    prefix = config.ingress.route_prefix.rstrip("/")
    rs = one(rendered[target], "RayService", "indexcache")
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["serve"] == config.ingress.port
        assert c["readinessProbe"]["httpGet"] == {"path": f"{prefix}/health", "port": "serve"}
        # /health answers within a second (serving/ingress.py HEALTH_TIMEOUT_S per role).
        from serving.ingress import HEALTH_TIMEOUT_S

        assert c["readinessProbe"]["timeoutSeconds"] > 2 * HEALTH_TIMEOUT_S
    app_monitor = one(rendered[target], "PodMonitor", "indexcache-app")
    (endpoint,) = app_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == f"{prefix}/metrics" and endpoint["port"] == "serve"


@pytest.mark.parametrize("target", TARGETS)
def test_calibrate_job_calibrates_and_publishes_the_served_model(rendered, target):
    from serving.cli import build_parser

    config = ServingConfig.from_yaml(SERVING_YAML[target])
    job = one(rendered[target], "RayJob", "indexcache-calibrate")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "indexcache"
    args = build_parser().parse_args(argv[1:])  # the real CLI: unknown flags fail here
    assert args.command == "calibrate" and args.publish
    assert args.model == config.model
    assert args.registry_model == config.model_name
    assert args.ray_address == "ray://indexcache-head-svc:10001"  # the RayService head Service
    assert args.out.startswith("/models/")
    assert job["spec"]["suspend"] is True  # `kubectl apply -k` must not start a GPU job
    assert job["spec"]["entrypointNumGpus"] >= 1


def test_tp8_replica_takes_a_whole_node(rendered):
    """The tensor-parallel overlay: 8 one-GPU bundles per replica, packed on one node, the role
    pin in the replica's bundle, on a worker group of 8-GPU pods."""
    (app,) = serve_doc(rendered["tp8"])["applications"]
    (dep,) = app["deployments"]
    bundles = dep["placement_group_bundles"]
    assert len(bundles) == 8 and dep["placement_group_strategy"] == "STRICT_PACK"
    assert bundles[0] == {"CPU": 12.0, "GPU": 1.0, render_k8s.role_resource("unified"): 1}
    assert all(b == {"CPU": 12.0, "GPU": 1.0} for b in bundles[1:])
    assert dep["ray_actor_options"]["num_gpus"] == 1.0
    engine = app["args"]["unified"]["engine"]
    assert engine["tensor_parallel_size"] == 8 and engine["fp8_weights"] is True
    rs = one(rendered["tp8"], "RayService", "indexcache")["spec"]["rayClusterConfig"]
    (group,) = rs["workerGroupSpecs"]
    (c,) = group["template"]["spec"]["containers"]
    assert _gpus(c) == 8
