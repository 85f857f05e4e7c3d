"""build_app(config) -> serve.Application: the one place that binds deployments.

unified:        OpenAIIngress -> UnifiedServer
disaggregated:  OpenAIIngress -> PrefillServer (first token + KV handle)
                              -> DecodeServer  (takes the KV payload, streams the rest)
                or, when the uncached prompt part is short (routing.max_local_prefill_tokens),
                OpenAIIngress -> DecodeServer  (prefills locally, streams everything)

Engine deployments route by prompt prefix (Serve's PrefixCacheAffinityRouter over token ids,
serving/routing.py), so a conversation's turns reach the replica whose prefix cache holds them.

Pools with `autoscaling` get Serve autoscaling configs driven by autoscale/ray_policy.py; the
others a fixed replica count. Engine deployments carry the plan settings as Serve `user_config`,
so editing it (serve deploy, KubeRay serveConfigV2) re-plans replicas in place.

`app_builder` is the import path form for `serve run` / serveConfigV2:
`import_path: serving.app:app_builder`, `args: {config: path/to/serving.yaml}` (or the config
fields inline).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from ray import serve

from autoscale.ray_policy import autoscaling_config
from serving.config import ServingConfig
from serving.deployments import DecodeServer, EngineSpec, PrefillServer, UnifiedServer
from serving.ingress import OpenAIIngress

_CLASSES = {"unified": UnifiedServer, "prefill": PrefillServer, "decode": DecodeServer}


def engine_spec(config: ServingConfig, role: str) -> EngineSpec:
    g = config.group(role)
    return EngineSpec(
        app_name=config.app_name,
        model_path=config.model,
        model_name=config.model_name,
        role=role,
        engine_kwargs=g.engine.engine_kwargs(),
        index_cache=config.index_cache,
        kv_backend=config.kv_transfer.backend,
        tensor_transport=config.kv_transfer.tensor_transport,
        kv_timeout_s=config.kv_transfer.timeout_s,
        metrics_interval_s=config.metrics_interval_s,
        max_local_prefill_tokens=config.routing.max_local_prefill_tokens,
        rank_num_cpus=g.num_cpus,
        rank_num_gpus=g.num_gpus,
    )


@functools.cache
def code_fingerprint() -> str:
    """Hash of our Python sources: part of every deployment `version`, so new code redeploys."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in ("serving", "model", "kernels", "autoscale"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()


def _version(*parts: Any) -> str:
    """A Serve deployment version from our code and the deployment's arguments.

    `serve deploy` / KubeRay derive versions from the config's import path, so a redeploy that
    only changes `user_config` (a plan pin) or replica counts reconfigures replicas in place.
    `serve.run` from Python instead draws a random version per run and replaces every replica;
    Ray 2.60 accepts an explicit version only with `_internal=True` (see `_pin`)."""
    blob = json.dumps([code_fingerprint(), *parts], sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def deployment_options(config: ServingConfig, role: str) -> dict[str, Any]:
    g = config.group(role)
    opts: dict[str, Any] = {
        "name": f"{role.capitalize()}Server",
        "ray_actor_options": {"num_cpus": g.num_cpus, "num_gpus": g.num_gpus},
        "max_ongoing_requests": g.max_ongoing_requests,
        "user_config": config.plans.user_config(),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # In-flight requests get this long to finish when a replica is scaled down.
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
    }
    tp = g.engine.tensor_parallel_size
    if tp > 1:
        # One bundle per rank: Serve puts the replica (rank 0) in bundle 0, the replica starts
        # the other ranks' actors in the others (serving/tp_replica.py); one node, for NCCL.
        bundle = {k: v for k, v in (("CPU", g.num_cpus), ("GPU", g.num_gpus)) if v > 0}
        opts["placement_group_bundles"] = [bundle] * tp
        opts["placement_group_strategy"] = "STRICT_PACK"
    router = config.routing.router_config()
    if router is not None:
        opts["request_router_config"] = router
    if g.autoscaling is not None:
        opts["autoscaling_config"] = autoscaling_config(role, g.autoscaling)
    else:
        opts["num_replicas"] = g.num_replicas
    return opts


def _pin(deployment, version: str):
    return deployment.options(version=version, _internal=True)


def build_app(config: ServingConfig) -> serve.Application:
    engines = {}
    for role in config.roles:
        opts, spec = deployment_options(config, role), engine_spec(config, role)
        dep = _CLASSES[role].options(**opts)
        engines[role] = _pin(dep, _version(spec, opts["ray_actor_options"])).bind(spec)
    ic = config.ingress
    # The ingress does not read `plans`: leaving it out keeps a plan change a pure user_config
    # update of the engine deployments (reconfigured in place), with no ingress redeploy.
    args = config.model_dump(mode="json", exclude={"plans"})
    ingress = OpenAIIngress.options(
        name="OpenAIIngress",
        num_replicas=ic.num_replicas,
        ray_actor_options={"num_cpus": ic.num_cpus},
        # The ingress only waits on engines; its own limit answers 429 before Serve queues.
        max_ongoing_requests=ic.max_concurrent_requests + 16,
        # `indexcache serve` drains the ingress itself first (serving/drain.py); this covers
        # a Serve-initiated stop (scale-down, redeploy) the same way.
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s + 5,
    )
    return _pin(ingress, _version(args)).bind(args, **engines)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run serving.app:app_builder config=serving.yaml` or inline config fields."""
    args = dict(args)
    path = args.pop("config", None)
    config = (
        ServingConfig.from_yaml(path, **args)
        if path is not None
        else ServingConfig.model_validate(args)
    )
    return build_app(config)
