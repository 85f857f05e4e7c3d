"""`indexcache render-k8s CONFIG [--out FILE]`: the RayService serveConfigV2 for a serving YAML.

KubeRay hands `spec.serveConfigV2` to Ray Serve's REST API unchanged; it names the application
builder (`serving.app:app_builder`) and carries the serving config inline as its args, so the
cluster runs exactly what CONFIG says. The output is a RayService patch (name + serveConfigV2)
that deploy/k8s kustomizations apply over their RayService; tests/deploy fail when a checked-in
render differs from what this command produces now.

Each engine role's replicas are pinned to a Ray custom resource `indexcache_<role>` that only
that role's worker group offers (rayStartParams), so prefill and decode land on their own node
pools and the Ray autoscaler grows the right pool. A tensor-parallel role also gets its
placement-group bundles (one per rank, the pin in bundle 0, where the replica runs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

IMPORT_PATH = "serving.app:app_builder"
BIND_HOST = "0.0.0.0"  # the Serve proxy must be reachable by probes and the Service
HEADER = (
    "# Rendered from {config} (next to this file) by `indexcache render-k8s {config}`.\n"
    "# Do not edit: edit {config} and render again (tests/deploy fail when this is stale).\n"
)


def role_resource(role: str) -> str:
    return f"indexcache_{role}"


def serve_config(config) -> dict[str, Any]:
    """The Serve config document (serveConfigV2) of one ServingConfig."""
    from serving.app import deployment_options

    if config.ingress.host != BIND_HOST:
        raise ValueError(
            f"ingress.host is {config.ingress.host!r}: on Kubernetes the Serve proxy "
            f"must bind {BIND_HOST} so probes and the serve Service reach it"
        )
    deployments = []
    for role in config.roles:
        opts = deployment_options(config, role)
        actor = {**opts["ray_actor_options"], "resources": {role_resource(role): 1}}
        dep = {"name": opts["name"], "ray_actor_options": actor}
        if "placement_group_bundles" in opts:
            # A tensor-parallel replica: the replica (rank 0) runs in bundle 0, so that bundle
            # carries the pin too; STRICT_PACK keeps the other ranks on its node.
            bundles = [dict(b) for b in opts["placement_group_bundles"]]
            bundles[0][role_resource(role)] = 1
            dep["placement_group_bundles"] = bundles
            dep["placement_group_strategy"] = opts["placement_group_strategy"]
        deployments.append(dep)
    app = {
        "name": config.app_name,
        "import_path": IMPORT_PATH,
        "route_prefix": config.ingress.route_prefix,
        # Only the fields the YAML sets: the embedded config reads like the file it came from.
        "args": config.model_dump(mode="json", exclude_unset=True),
        "deployments": deployments,
    }
    return {"http_options": {"host": BIND_HOST, "port": config.ingress.port}, "applications": [app]}


def render(config_path: str | Path, name: str = "indexcache") -> str:
    """The RayService patch for CONFIG as YAML text (header comment included)."""
    from serving.config import ServingConfig

    config = ServingConfig.from_yaml(config_path)
    body = yaml.safe_dump(serve_config(config), sort_keys=False, width=100)
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {"serveConfigV2": body},
    }
    return HEADER.format(config=Path(config_path).name) + yaml.dump(
        patch, Dumper=_BlockDumper, sort_keys=False, width=100
    )


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks: serveConfigV2 stays readable YAML in the manifest."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None
    )


_BlockDumper.add_representer(str, _str)


def register(p) -> None:
    p.add_argument("config", help="serving YAML (ServingConfig)")
    p.add_argument("--out", default=None, help="write the RayService patch here (default stdout)")
    p.add_argument("--name", default="indexcache", help="RayService name (default indexcache)")
    p.set_defaults(run=run)


def run(args) -> int:
    text = render(args.config, args.name)
    if args.out is None:
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0
